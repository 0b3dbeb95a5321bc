import pytest
import json

import numpy as np
import torch
from PIL import Image

from helpers import cli_here, informative_model, run_cli, tiny_images
from sparse_transformer.model.generate import compiled_step, generate
from sparse_transformer.sysutil import compiler_trusted
from sparse_transformer.train.config import build_config
from sparse_transformer.train.loop import train

SMALL = [("model.d_model", "32"), ("model.n_layer", "2"), ("model.n_head", "2"), ("train.steps", "2"),
         ("train.batch_size", "2"), ("train.sample_bytes", "0"), ("train.eval_max_bytes", "512")]


@pytest.mark.slow
def test_sample_text(tmp_path):
    cfg = build_config(None, None, SMALL + [("model.n_ctx", "64"), ("model.stride", "8"), ("train.out_dir", str(tmp_path))])
    train(cfg, show_progress=False, echo=lambda *_: None)
    out = tmp_path / "s.txt"
    r = run_cli("sample", str(tmp_path), "-n", "2", "--length", "20", "--prompt", "ab", "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.count("=== sample") == 2 and "ab" in text
    r = cli_here("sample", str(tmp_path), "--complete", "1")
    assert r.returncode == 2 and "--complete is for image models" in r.stderr


@pytest.mark.slow
def test_sample_images_and_completion(tmp_path):
    data = tiny_images(tmp_path / "data", "tiny-images", counts=(("train", 40), ("val", 4), ("test", 4)))
    run = tmp_path / "run"
    cfg = build_config(None, None, SMALL + [
        ("model.n_ctx", "48"), ("model.stride", "12"), ("model.data_shape", "4x4x3"), ("data.name", "tiny-images"),
        ("data.dir", str(tmp_path / "data")), ("train.out_dir", str(run))])
    train(cfg, show_progress=False, echo=lambda *_: None)
    r = run_cli("sample", str(run), "-n", "4", "-o", str(tmp_path / "grid.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "grid.png").size == (2 * 6 + 2, 2 * 6 + 2)  # 2 x 2 grid of 4 x 4 images, 2-pixel gaps
    r = run_cli("sample", str(run), "-n", "3", "--complete", "2", "-o", str(tmp_path / "c.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(tmp_path / "c.png"))
    assert img.shape == (6 + 2, 5 * 6 + 2, 3)  # original, kept half, 3 completions
    test2 = np.frombuffer((data / "test.bin").read_bytes(), dtype=np.uint8)[2 * 48 : 3 * 48].reshape(4, 4, 3)
    assert (img[2:6, 2:6] == test2).all()  # the original
    assert (img[2:4, 8:12] == test2[:2]).all() and (img[4:6, 8:12] == 0).all()  # kept top half
    assert all((img[2:4, 2 + 6 * k : 6 + 6 * k] == test2[:2]).all() for k in range(2, 5))  # completions keep it
    r = cli_here("sample", str(run), "--complete", "9")
    assert r.returncode == 2 and "--complete must be in [0, 3]" in r.stderr
    Image.fromarray(test2).save(tmp_path / "mine.png")  # the same image, as a file
    r = run_cli("sample", str(run), "-n", "1", "--complete", str(tmp_path / "mine.png"), "-o", str(tmp_path / "f.png"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (np.asarray(Image.open(tmp_path / "f.png"))[2:6, 2:6] == test2).all()
    Image.fromarray(test2[:3]).save(tmp_path / "wrong.png")
    r = cli_here("sample", str(run), "--complete", str(tmp_path / "wrong.png"))
    assert r.returncode == 2 and "expected 4x4" in r.stderr


@pytest.mark.slow
def test_sample_audio_wav(tmp_path, data_dir):
    import wave

    from sparse_transformer.data.prepare import prepare

    prepare("audio", data_dir / "brahms-hungarian-dance-5.ogg", tmp_path / "data")
    run = tmp_path / "run"
    cfg = build_config(None, None, SMALL + [("model.n_ctx", "256"), ("model.stride", "16"), ("data.name", "audio"),
                                            ("data.dir", str(tmp_path / "data")), ("train.out_dir", str(run))])
    train(cfg, show_progress=False, echo=lambda *_: None)
    out = tmp_path / "s.wav"
    r = run_cli("sample", str(run), "-n", "2", "--length", "200", "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert w.getframerate() == 12000 and w.getnchannels() == 1
        assert w.getnframes() == 2 * 200 + 3000  # two samples and a quarter second of silence between
    r = cli_here("sample", str(run), "--prompt", "x")
    assert r.returncode == 2 and "--prompt is for text models; this is an audio model" in r.stderr
    # a recording to continue: prefilled, and the output starts with it
    from sparse_transformer.data.formats import mu_law_encode, write_wav

    codes = mu_law_encode(np.sin(np.arange(120) / 5.0).astype(np.float32) * 0.5).astype(np.uint8)
    write_wav(tmp_path / "prompt.wav", codes)
    r = run_cli("sample", str(run), "-n", "2", "--length", "50", "--prompt-audio", str(tmp_path / "prompt.wav"),
                "-o", str(out), "--no-progress")
    assert r.returncode == 0, r.stderr
    with wave.open(str(out)) as w:
        assert w.getnframes() == 2 * (120 + 50) + 3000
    write_wav(tmp_path / "long.wav", np.zeros(300, dtype=np.uint8))
    r = cli_here("sample", str(run), "--prompt-audio", str(tmp_path / "long.wav"))
    assert r.returncode == 2 and "use a shorter recording" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_sample_smoke(tmp_path):
    out = tmp_path / "b.json"
    r = run_cli("bench", "sample", "--positions", "64,512", "--length", "128", "--layers", "1", "--d-model", "32",
                "--heads", "2", "--stride", "16", "-c", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = {row["pattern"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"dense", "strided", "fixed"}
    assert rows["dense"]["cache_fraction_of_dense"] == 1.0
    assert rows["fixed"]["cache_mb"] < rows["dense"]["cache_mb"]  # n_ctx 513: 33 blocks x 4 + 16 of 513
    assert all(row["prefill_s"] > 0 and row["forward_s"] > 0 for row in rows.values())
    r = cli_here("bench", "sample", "--positions", "64")
    assert r.returncode == 2 and "two or more ascending positions" in r.stderr


@pytest.mark.slow
def test_bench_sample_compiled_against_a_compiled_dense_cache():
    from sparse_transformer.bench import sample as bs
    from sparse_transformer.sysutil import compiler_trusted

    if not compiler_trusted():
        pytest.skip("compiled code is not trusted on this CPU (sysutil.compiler_trusted)")
    res = bs.run(positions=(32, 64), gen_length=64, n_layer=1, d_model=32, n_head=2, stride=8, c=2,
                 patterns=("fixed",), repeat=3, compile=True, progress=lambda *_: None)
    row = res["results"][0]
    assert row["tok_s_dense_cache_compiled"] > 0 and row["compiled_vs_dense_cache"] > 0
    assert "x, both compiled" in bs.report(res)


def test_image_data_shape_drives_the_model(tmp_path):
    tiny_images(tmp_path / "data")
    said = []
    cfg = build_config(None, None, SMALL + [("data.name", "imgs"), ("data.dir", str(tmp_path / "data")),
                                            ("train.out_dir", str(tmp_path / "run"))])
    train(cfg, show_progress=False, echo=said.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert saved["data_shape"] == [4, 4, 3] and saved["stride"] == 12 and saved["n_ctx"] == 48
    assert any("model.stride=12 (one row)" in s for s in said)


def _random_model(pattern, rotary=False, n_ctx=64):
    return informative_model(n_ctx=n_ctx, d_model=32, n_layer=2, n_head=2, pattern=pattern, stride=8, c=2,
                             rotary=rotary)


@pytest.mark.parametrize("pattern", ["strided", "fixed", "dense", "local", "fixed_summary:8:2:true", "fixed_block:8",
                                     "dilated:4:2", "longformer:6:3", "bigbird:8:1:1:8"])
@pytest.mark.parametrize("rotary", [False, True])
def test_static_decoding_step_equals_the_full_forward(pattern, rotary):
    """model.decode (a tensor position, static shapes: the most keys any position reads, masked) gives the
    full forward pass's logits after a prefill, for every pattern."""
    model = _random_model(pattern, rotary)
    x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(1))
    full, _ = model(x)
    cache = model.new_cache(2)
    model(x[:, :9], cache=cache)
    for t in range(9, 64):
        assert torch.allclose(model.decode(x[:, t - 1], torch.tensor(t), cache), full[:, t], atol=1e-4), t
    cache = model.new_cache(2)  # with length = t + 1: the fixed and dense caches read a prefix
    model(x[:, :9], cache=cache)
    for t in range(9, 64):
        assert torch.allclose(model.decode(x[:, t - 1], torch.tensor(t), cache, t + 1), full[:, t], atol=1e-4), t


@pytest.mark.parametrize("pattern,combine,groups", [("strided", "multihead", 2), ("fixed", "merged", 4),
                                                    ("fixed", "interleaved", 1)])
def test_static_decoding_step_with_groups_of_heads(pattern, combine, groups):
    """Heads in several groups (each group's q, k, v gathered and its output scattered) or in one group of
    every head (read through a slice): model.decode gives the full forward's logits (4 heads, fixed with
    distinct summary offsets per head)."""
    model = informative_model(n_ctx=48, d_model=64, n_layer=2, n_head=4, stride=8, c=2, pattern=pattern,
                              combine=combine, distinct_heads=pattern == "fixed")
    x = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(2))
    cache = model.new_cache(2)
    assert len(cache[0].groups) == groups and cache[0].whole == (groups == 1)
    with torch.no_grad():  # as generate runs it: decode.c and the transposed weights where they apply
        full, _ = model(x)
        model(x[:, :9], cache=cache)
        for t in range(9, 48):
            assert torch.allclose(model.decode(x[:, t - 1], torch.tensor(t), cache, t + 1), full[:, t], atol=1e-4), t


def test_compile_is_declined_where_compiled_code_is_not_trusted(monkeypatch):
    """At AVX2 (mocked) generate(compile=True) decodes eagerly, says so once, and gives eager's samples."""
    import torch

    import sparse_transformer.model.generate as G

    model = _random_model("fixed", n_ctx=32)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(G, "_warned_untrusted", False)
    monkeypatch.setattr(G, "compiled_step", lambda *a: pytest.fail("compiled at AVX2"))
    with pytest.warns(UserWarning, match="not trusted at AVX2"):
        got = generate(model, 2, 10, prompt=b"ab", seed=1, compile=True)
    assert torch.equal(got, generate(model, 2, 10, prompt=b"ab", seed=1))


@pytest.mark.slow
@pytest.mark.skipif(not compiler_trusted(), reason="compiled code is used only where PyTorch runs at AVX512")
@pytest.mark.parametrize("pattern", ["strided", "fixed", "dense"])
def test_compiled_step_is_captured_once_and_equals_eager(pattern):
    """generate(compile=True): no recompilation per position and no graph break, though the fixed and
    dense caches read a prefix that grows with the position: at most one graph for the first decoded
    position and one for every later one (strided reads no prefix: one in all). The same samples as
    eager; a second call reuses the graphs. The graph reads the transposed weights of model.Linear and
    the fixed and dense prefixes with the native decoding kernel: weights changed in place between two
    calls reach it without a recompilation, and samples still equal eager's."""
    import torch._dynamo.utils as du

    from sparse_transformer.attention import native
    from sparse_transformer.attention.native import ops

    model = _random_model(pattern, n_ctx=96)
    torch._dynamo.reset()
    du.counters.clear()
    kernel_calls = []  # decode.c's steps (st_decode), eager or compiled
    built = ops._built

    class Counted:
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            if name == "st_decode":
                kernel_calls.append(name)
            return getattr(self.lib, name)

    def counted(D):
        return Counted(built(D))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ops, "_built", counted)
        compiled = generate(model, 2, 60, prompt=b"abc", seed=3, compile=True)
    graphs = du.counters["stats"]["unique_graphs"]
    assert graphs == (1 if pattern == "strided" else 2), dict(du.counters["stats"])
    if native.available(16):  # fixed, dense: 2 layers x 57 compiled steps (strided: the eager first steps only)
        assert (len(kernel_calls) >= 2 * 57) == (pattern != "strided"), len(kernel_calls)
    generate(model, 2, 50, prompt=b"abcdefg", seed=4, compile=True)
    assert du.counters["stats"]["unique_graphs"] == graphs, dict(du.counters["stats"])
    assert not du.counters["graph_break"], dict(du.counters["graph_break"])
    assert torch.equal(compiled, generate(model, 2, 60, prompt=b"abc", seed=3))
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(1.5)
            block.ff.fc.weight.mul_(-1.0)
    changed = generate(model, 2, 60, prompt=b"abc", seed=3, compile=True)
    assert du.counters["stats"]["unique_graphs"] == graphs, dict(du.counters["stats"])
    assert torch.equal(changed, generate(model, 2, 60, prompt=b"abc", seed=3)) and not torch.equal(changed, compiled)
    with torch.no_grad():  # the compiled step alone, with no eager step to refresh the copies first
        model.blocks[0].ff.fc.weight.mul_(0.5)
        step, eager_cache = compiled_step(model, model.new_cache(2)), model.new_cache(2)
        prev = torch.tensor([7, 9])
        for t in range(1, 4):
            got = step(prev, t)  # before any eager call
            assert torch.allclose(got, model.decode(prev, torch.tensor(t), eager_cache, t + 1), atol=1e-5), t
