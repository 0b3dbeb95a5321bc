import pytest
"""The comparison benchmarks in CI-sized runs (their figures live in BENCHMARKS.md)."""
import json
import math

import numpy as np
import torch

from helpers import run_cli

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
    r = run_cli("bench", "compare", "--modalities", "audio")
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
    r = run_cli("bench", "context", str(tmp_path / "run"), "--contexts", "128")
    assert r.returncode == 2 and "below model.n_ctx=128" in r.stderr

    out = tmp_path / "len.json"
    r = run_cli("bench", "length", "--budget-mb", "60", "--patterns", "strided", "--start", "256", "--max-n", "4096",
                "--bisect", "1", "--layers", "1", "--d-model", "32", "--json", str(out))
    assert r.returncode == 0, r.stderr
    for row in json.loads(out.read_text())["results"]:
        if row["max_n"]:
            assert row["peak_mb_at_max"] <= 60
        assert row["first_failing_n"] is None or row["first_failing_n"] > (row["max_n"] or 0)
