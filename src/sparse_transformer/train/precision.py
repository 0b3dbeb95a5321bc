"""``train.precision = "auto"``: bfloat16 where the processor computes it natively, else float32.

The paper trains in half precision on GPUs (section 5.6). On a CPU, bfloat16
pays only where the hardware computes it (AVX512-BF16 or AMX on x86, bf16
instructions on recent arm64). Elsewhere PyTorch emulates it: on an AVX2
machine a bfloat16 matrix product runs at 1-2 GFLOP/s against ~170 in
float32, and a bfloat16 run trains 10x slower. The answer here is measured the
way PyTorch will run, so ``ATEN_CPU_CAPABILITY=avx2`` on an AVX512-BF16
machine gives float32: a small bfloat16 and float32 matrix product are timed
once per machine, PyTorch and capability, and the result is cached beside the
native kernel (``$SPARSE_TRANSFORMER_CACHE``).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import warnings

import torch

from ..attention.native.build import _cpu_flags, cache_dir
from ..sysutil import atomic_write_text

PRECISIONS = ("auto", "float32", "bfloat16", "float16")
# bfloat16 autocast adds casts around every matrix product; it pays when the product itself is
# clearly faster (AVX512-BF16 Zen 4/5: 3-4x at 512^3; emulated on AVX2: 80x slower).
MIN_SPEEDUP = 1.5

_warned: set[str] = set()


def _time_matmul(dtype: torch.dtype, n: int = 384, repeat: int = 5) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def _cache_key() -> str:
    parts = [torch.__version__, torch.backends.cpu.get_cpu_capability(), platform.machine(), _cpu_flags(),
             str(torch.get_num_threads()), *(os.environ.get(v, "") for v in ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"))]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def cpu_bf16_speedup() -> float:
    """float32 time / bfloat16 time of a 384^3 matrix product on this CPU (measured once, cached)."""
    path = cache_dir() / f"bf16-speed-{_cache_key()}.json"
    try:
        return float(json.loads(path.read_text())["speedup"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    speedup = _time_matmul(torch.float32) / _time_matmul(torch.bfloat16)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"speedup": speedup, "capability": torch.backends.cpu.get_cpu_capability(),
                                            "torch": torch.__version__}) + "\n")
    except OSError:
        pass  # an unwritable cache only costs the measurement next time
    return speedup


def resolve(precision: str, device: torch.device, speedup=cpu_bf16_speedup) -> tuple[str, str]:
    """(precision to run, why) for ``train.precision`` on ``device``; warns once for emulated bfloat16."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device.type == "cuda":
        if precision != "auto":
            return precision, "as set"
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU computes bfloat16"
        return "float32", "auto: this GPU has no bfloat16"
    if precision == "float16":
        raise ValueError("train.precision float16 needs a CUDA device (dynamic loss scaling); use bfloat16 on the CPU")
    if precision == "float32":
        return "float32", "as set"
    cap = torch.backends.cpu.get_cpu_capability()
    s = speedup()
    native = s >= MIN_SPEEDUP
    if precision == "bfloat16":
        if not native and "bf16" not in _warned:
            _warned.add("bf16")
            warnings.warn(f"train.precision = bfloat16 on a CPU without native bfloat16 ({cap}): a bfloat16 matrix "
                          f"product runs {1 / s:.1f}x slower than float32 here; 'auto' would choose float32",
                          RuntimeWarning, stacklevel=2)
        return "bfloat16", "as set" + ("" if native else f" (emulated here: matrix products {1 / s:.1f}x slower)")
    if native:
        return "bfloat16", f"auto: this CPU computes bfloat16 natively ({cap}; matrix products {s:.1f}x float32)"
    return "float32", f"auto: no native bfloat16 here ({cap}; bfloat16 matrix products {1 / s:.1f}x slower)"
