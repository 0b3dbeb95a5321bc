"""Defaults that follow the processor: train.precision = "auto", the progress log, the EMA warm-up,
the compressor figures at the end of a run."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_transformer.train import precision as prec
from sparse_transformer.train.config import build_config
from sparse_transformer.train.loop import train
from sparse_transformer.train.progress import Progress

CPU = torch.device("cpu")


def test_auto_precision_follows_the_measured_bfloat16_speed():
    assert prec.resolve("auto", CPU, speedup=lambda: 4.0)[0] == "bfloat16"
    precision, why = prec.resolve("auto", CPU, speedup=lambda: 0.03)
    assert precision == "float32" and "no native bfloat16" in why and "33.3x slower" in why
    assert prec.resolve("float32", CPU, speedup=lambda: 4.0) == ("float32", "as set")
    with pytest.raises(ValueError, match="float16 needs a CUDA device"):
        prec.resolve("float16", CPU)
    with pytest.raises(ValueError, match="must be one of auto"):
        prec.resolve("half", CPU)


def test_explicit_bfloat16_without_native_support_warns_once_with_the_slowdown(monkeypatch):
    monkeypatch.setattr(prec, "_warned", set())
    with pytest.warns(RuntimeWarning, match="runs 50.0x slower than float32"):
        assert prec.resolve("bfloat16", CPU, speedup=lambda: 0.02)[0] == "bfloat16"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prec.resolve("bfloat16", CPU, speedup=lambda: 0.02)  # once only


def test_auto_precision_on_cuda(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert prec.resolve("auto", cuda)[0] == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert prec.resolve("auto", cuda)[0] == "float32"
    assert prec.resolve("float16", cuda) == ("float16", "as set")


def test_bfloat16_speed_is_measured_once_and_cached_by_capability(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSE_TRANSFORMER_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(prec, "_time_matmul", lambda dtype, **k: calls.append(dtype) or (1.0 if dtype == torch.float32 else 0.25))
    assert prec.cpu_bf16_speedup() == 4.0 and len(calls) == 2
    assert prec.cpu_bf16_speedup() == 4.0 and len(calls) == 2  # from the cache
    files = list(tmp_path.glob("bf16-speed-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["speedup"] == 4.0
    assert not list(tmp_path.glob("*.tmp*")), "written atomically: no temporary file left"
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # another key: measured again
    prec.cpu_bf16_speedup()
    assert len(calls) == 4 and len(list(tmp_path.glob("bf16-speed-*.json"))) == 2


@pytest.mark.slow
@pytest.mark.skipif(" avx512_bf16" not in (Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""),
                    reason="needs a CPU with AVX512-BF16")
def test_avx2_capability_on_a_bf16_machine_resolves_to_float32(tmp_path):
    env = {**os.environ, "SPARSE_TRANSFORMER_CACHE": str(tmp_path), "ATEN_CPU_CAPABILITY": "avx2",
           "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
    code = "import torch; from sparse_transformer.train.precision import resolve; print(resolve('auto', torch.device('cpu'))[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "float32", out.stderr


def test_progress_writes_plain_lines_when_not_a_terminal():
    stream = io.StringIO()  # not a tty
    p = Progress(steps=100, start=0, time_limit=0, by_time=False, enabled=True, stream=stream, interval=0.0)
    for step in range(1, 101):
        p.update(step, 1.0 if step % 10 == 0 else None, 5000.0 if step % 10 == 0 else None)
    p.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue() and len(lines) >= 9
    assert lines[-1].startswith("step 100/100 | loss 1.0000 | 1.443 bits/dim | 5,000 tok/s | ETA ")
    quiet = io.StringIO()
    p = Progress(steps=100, start=0, time_limit=600, by_time=True, enabled=True, stream=quiet)
    assert p.interval == 10.0  # a 10-minute budget: a line every 10 s, 60 lines
    for step in range(1, 50):
        p.update(step, 1.0, 10.0)
    assert quiet.getvalue() == ""  # nothing before the interval has passed


def test_short_ema_run_never_reports_worse_than_its_last_weights(tmp_path):
    cfg = build_config(None, None, [
        ("model.n_ctx", "64"), ("model.d_model", "32"), ("model.n_layer", "2"), ("model.n_head", "2"),
        ("model.stride", "8"), ("train.batch_size", "4"), ("train.warmup", "2"), ("train.steps", "30"),
        ("train.eval_max_bytes", "3000"), ("train.sample_bytes", "0"), ("train.ema", "0.999"),
        ("train.precision", "float32"), ("train.out_dir", str(tmp_path)), ("train.dynamic_eval_lr", "0.2"),
    ])
    lines = []
    summary = train(cfg, show_progress=False, echo=lines.append)
    evals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_bpb" in l]
    ema, last = (next(e["val_bpb"] for e in evals if e["weights"] == w) for w in ("ema", "last"))
    assert summary["val_bits_per_dim"] == min(ema, last)
    # With the warm-up, 30 updates average about the last 10 steps: close to the last weights, not the
    # initial ones (a plain 0.999 average would sit near 8 bits, the untrained model).
    assert ema < last + 0.3, (ema, last)
    assert any(l.startswith("the same validation bytes: bzip2 -9") for l in lines)
    assert set(summary["compressors"]) == {"bz2", "xz", "zlib"}
    # dynamic evaluation, from the same (EMA or last) weights, printed beside the compressors and logged
    assert any(l.startswith("adapting as it reads, as the compressors do (dynamic evaluation, SGD at 0.2") for l in lines)
    logged = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if "val_bpb_dynamic" in l]
    assert [e["val_bpb_dynamic"] for e in logged] == [summary["val_bits_per_dim_dynamic"]]
    assert 0 < summary["val_bits_per_dim_dynamic"] < 9
