import pytest
"""The comparison benchmarks in CI-sized runs (their figures live in BENCHMARKS.md)."""
import json
import math

import numpy as np
import torch

from helpers import cli_here, run_cli

from sparse_transformer.bench.compare import compressor_bits, min_context_bits
from sparse_transformer.data.prepare import prepare
from sparse_transformer.model import ModelConfig, SparseTransformer
from sparse_transformer.train.evaluate import evaluate


@pytest.mark.slow
def test_compare_quick(data_dir, tmp_path):
    prepare("fashion-mnist", data_dir / "fashion-mnist", tmp_path)
    out = tmp_path / "c.json"
    r = run_cli("bench", "compare", "--quick", "--steps", "3", "--data-dir", str(tmp_path), "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["results"]
    assert [(x["modality"], x["model"]) for x in rows] == [
        (m, p) for m in ("text", "images") for p in ("compressors", "dense", "strided", "fixed")]
    for x in rows:
        assert 0 < x["val_bits_per_dim"] < 8.5
    assert [x["rotary"] for x in rows if x["model"] != "compressors"] == [True] * 3 + [False] * 3
    r = cli_here("bench", "compare", "--modalities", "audio")
    assert r.returncode == 2 and "allowed: text, images" in r.stderr


def test_compressor_floor():
    rng = np.random.default_rng(0)
    assert compressor_bits(rng.integers(0, 256, 20000, dtype=np.uint8).tobytes())["xz"] > 7.9  # noise
    assert compressor_bits(b"ab" * 10000)["bz2"] < 0.1


def test_min_context_zero_is_plain_evaluation_and_context_helps_a_copy_task():
    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(n_ctx=64, d_model=32, n_layer=2, n_head=2, pattern="strided", stride=8))
    data = np.random.default_rng(0).integers(0, 256, 640, dtype=np.uint8)
    plain = evaluate(model, data, batch_size=4)["bits_per_dim"]
    assert math.isclose(min_context_bits(model, data, 0, 0, 640), plain, rel_tol=1e-5)
    # every scored byte sees at least k bytes: the same bytes scored for every k
    a = min_context_bits(model, data, 32, 48, 640)
    b = min_context_bits(model, data, 48, 48, 640)
    assert a != b and 0 < a < 10 and 0 < b < 10


@pytest.mark.slow
def test_context_and_length_cli(tmp_path):
    from sparse_transformer.train.config import build_config
    from sparse_transformer.train.loop import train

    cfg = build_config(None, None, [("model.d_model", "32"), ("model.n_layer", "2"), ("model.n_head", "2"),
                                    ("model.n_ctx", "128"), ("model.stride", "16"), ("train.steps", "2"),
                                    ("train.batch_size", "2"), ("train.sample_bytes", "0"),
                                    ("train.eval_max_bytes", "512"), ("train.out_dir", str(tmp_path / "run"))])
    train(cfg, show_progress=False, echo=lambda *_: None)
    out = tmp_path / "ctx.json"
    r = run_cli("bench", "context", str(tmp_path / "run"), "--contexts", "32,64,120", "--max-bytes", "1024", "--json", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [x["min_context"] for x in res["results"]] == [0, 32, 64, 120] and res["config"]["scored_bytes"] == 1024
    r = cli_here("bench", "context", str(tmp_path / "run"), "--contexts", "128")
    assert r.returncode == 2 and "below model.n_ctx=128" in r.stderr

    out = tmp_path / "len.json"
    r = run_cli("bench", "length", "--budget-mb", "20", "--patterns", "strided", "--start", "512", "--max-n", "4096",
                "--bisect", "1", "--layers", "1", "--d-model", "32", "--json", str(out))  # 512 fits (18 MB) or not
    assert r.returncode == 0, r.stderr
    for row in json.loads(out.read_text())["results"]:
        if row["max_n"]:
            assert row["peak_mb_at_max"] <= 60
        assert row["first_failing_n"] is None or row["first_failing_n"] > (row["max_n"] or 0)


def test_length_search_stays_within_max_n(monkeypatch):
    """When every doubling up to --max-n fits, the answer is --max-n: no bisection above it."""
    from sparse_transformer.bench import length as bl

    tried = []
    monkeypatch.setattr(bl, "_run", lambda case: tried.append(case["model"]["n_ctx"]) or {"peak_mb": 1.0})
    res = bl.run(budget_mb=10, patterns=("strided",), recompute=(False,), start=256, max_n=1024, progress=lambda *_: None)
    assert tried == [256, 512, 1024] and res["results"][0]["max_n"] == 1024
    assert res["results"][0]["first_failing_n"] is None
    tried.clear()
    monkeypatch.setattr(bl, "_run", lambda case: tried.append(case["model"]["n_ctx"]) or {"peak_mb": case["model"]["n_ctx"] / 100})
    res = bl.run(budget_mb=7, patterns=("strided",), recompute=(False,), start=256, max_n=4096, steps=2, progress=lambda *_: None)
    assert tried == [256, 512, 1024, 768, 640] and res["results"][0]["max_n"] == 640  # bisected in (512, 1024)


def test_flex_bench_times_predicate_descriptions_compiled_and_restores_the_threshold(monkeypatch):
    """``bench attention --against flex``: a pattern described from its predicate is also timed with
    that evaluation compiled (a compile below COMPILE_FROM, which is restored); closed forms are not."""
    from dataclasses import dataclass

    from sparse_transformer import patterns as P
    from sparse_transformer.bench import flex
    from sparse_transformer.patterns import predicate

    @dataclass(frozen=True)
    class Window(P.Pattern):  # no closed form: described from allowed()
        def allowed(self, i, j):
            return (i - j) < 5

    assert P.Custom(lambda i, j: i - j < 5).from_predicate and Window().from_predicate
    assert not P.Strided(8).from_predicate and not P.Fixed(8, 2).from_predicate
    calls = []
    monkeypatch.setattr(predicate, "_chunk_fn", lambda *a: calls.append(predicate.COMPILE_FROM) or
                        (predicate._chunk_counts(*a[:1], *a[2:5]), False))
    before = predicate.COMPILE_FROM
    assert flex._compiled_build(Window(), 100, 16) >= 0
    assert calls == [0, 0] and predicate.COMPILE_FROM == before  # both builds below the threshold, then restored


def test_flex_bench_report_shows_compiled_columns_only_when_measured():
    from sparse_transformer.bench import flex

    base = {"N": 64, "ours_fwd_s": 1.0, "ours_build_s": 0.5, "flex128_fwd_s": 2.0, "flex128_mask_s": 5.0,
            "vs_flex128": 2.0, "build_vs_flex128": 10.0}
    result = {"config": {"B": 1, "H": 1, "D": 16, "blocks": [128]}, "machine": {"cpu": "x"}, "results": [
        {**base, "case": "strided:8"}]}
    assert "compiled, warm s" not in flex.report(result) and "_compile=True" not in flex.report(result)
    result["results"].append({**base, "case": "mine", "ours_build_compiled_s": 0.05, "cbuild_vs_flex128": 100.0,
                              "flex128_mask_compiled_s": 0.4, "build_vs_flexc128": 8.0})
    text = flex.report(result)
    assert "compiled, warm s" in text and "@128 _compile=True, warm s" in text and "100" in text
