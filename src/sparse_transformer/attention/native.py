"""The fused CPU kernel for local and strided attention (``native.c``, section 5.5).

The C source ships with the package and is compiled on first use with the
system's C compiler (``$CC``, else ``cc``) for this machine's CPU
(``-O3 -march=native -fopenmp``), one library per head width, cached in
``$SPARSE_TRANSFORMER_CACHE`` (default ``~/.cache/sparse_transformer``).
Compiling takes about a second. When there is no compiler, or the build fails,
``load`` warns once and returns None, and the attention runs on the fused-SDPA
decomposition instead (exact, about 2.8x slower for Strided(128) at N=16384).
Set ``SPARSE_TRANSFORMER_NATIVE=0`` to turn the kernel off.

The kernel computes in float32 (other dtypes are converted by the caller) on
head widths that are multiples of 16 (the caller pads others with zeros).
Forward and backward are registered as the custom operators
``sparse_transformer::native_fwd`` / ``native_bwd`` with an autograd formula,
so ``torch.compile`` traces through the attention without a graph break.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]

_libs: dict[int, ctypes.CDLL | None] = {}
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def enabled() -> bool:
    return os.environ.get("SPARSE_TRANSFORMER_NATIVE", "1") not in ("0", "false", "no", "off")


def padded_dim(head_dim: int) -> int:
    """The kernel works on head widths that are multiples of 16; narrower heads are zero-padded."""
    return -(-head_dim // 16) * 16


def cache_dir() -> Path:
    env = os.environ.get("SPARSE_TRANSFORMER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sparse_transformer"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(head_dim: int) -> Path:
    """Compile (or find in the cache) the library for ``head_dim``; raises on failure."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    flags = FLAGS + [f"-DHD={head_dim}"]
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, *flags, platform.machine(), _cpu_flags()]).encode()
    ).hexdigest()[:16]
    out = cache_dir() / f"native-hd{head_dim}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}")
        os.replace(tmp, out)  # atomic: another process may be building the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def load(head_dim: int) -> ctypes.CDLL | None:
    """The compiled kernel for ``head_dim``, or None (with a warning once) if it cannot be built."""
    if head_dim in _libs:
        return _libs[head_dim]
    lib = None
    try:
        lib = ctypes.CDLL(str(_build(head_dim)))
        ptr, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
        lib.st_forward.argtypes = [i, i, i, i, i, f, i] + [ptr] * 5
        lib.st_backward.argtypes = [i, i, i, i, i, f, i] + [ptr] * 9
        lib.st_forward.restype = lib.st_backward.restype = i
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warn_once(
            "build",
            f"sparse_transformer: the native CPU attention kernel could not be built ({e}); "
            "falling back to the slower fused-SDPA decomposition",
        )
        lib = None
    _libs[head_dim] = lib
    return lib


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _built(head_dim: int) -> ctypes.CDLL:
    lib = load(head_dim)
    if lib is None:
        raise ValueError(f"the native attention kernel for head width {head_dim} could not be built (see the warning)")
    return lib


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("native attention kernel: out of memory for its scratch buffers")


# The kernel as two custom operators with a registered autograd formula, so that
# torch.compile sees them as opaque nodes instead of breaking its graph at ctypes.
@torch.library.custom_op("sparse_transformer::native_fwd", mutates_args=())
def native_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, l: int, strict: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v (BH, N, D) contiguous float32, N a multiple of l -> o (BH, N, D) and log-sum-exps (BH, N)."""
    lib = _built(q.shape[-1])
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    _check(lib.st_forward(q.shape[0], q.shape[1], w, l, int(strict), scale, torch.get_num_threads(),
                          *map(_ptr, (q, k, v, o, lse))))
    return o, lse


@native_fwd.register_fake
def _(q, k, v, w, l, strict, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2])


@torch.library.custom_op("sparse_transformer::native_bwd", mutates_args=())
def native_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
    w: int, l: int, strict: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of q, k, v (each (BH, N, D)) given the output gradient ``do``."""
    lib = _built(q.shape[-1])
    dq, dk, dv = (torch.zeros_like(q) for _ in range(3))
    _check(lib.st_backward(q.shape[0], q.shape[1], w, l, int(strict), scale, torch.get_num_threads(),
                           *map(_ptr, (q, k, v, o, do, lse, dq, dk, dv))))
    return dq, dk, dv


@native_bwd.register_fake
def _(q, k, v, o, do, lse, w, l, strict, scale):
    return torch.empty_like(q), torch.empty_like(q), torch.empty_like(q)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, w, l, strict, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (w, l, strict, scale)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = native_bwd(q, k, v, o, do.contiguous(), lse, *ctx.args)
    return dq, dk, dv, None, None, None, None


native_fwd.register_autograd(_backward, setup_context=_setup_context)


def native_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, l: int, strict: bool,
                     scale: float) -> torch.Tensor:
    """Local window ``w`` (0: none) plus the strided columns of stride ``l`` (0: none).

    q, k, v [B, H, n, D] float32 on the CPU, D a kernel width (``padded_dim``),
    the kernel for it loaded; returns [B, H, n, D].
    """
    B, H, n, D = q.shape
    pad = -n % l if l else 0
    N = n + pad
    q, k, v = (F.pad(t, (0, 0, 0, pad)) if pad else t for t in (q, k, v))
    q, k, v = (t.reshape(B * H, N, D).contiguous() for t in (q, k, v))
    o, _ = native_fwd(q, k, v, w, l, strict, scale)
    return o.view(B, H, N, D)[:, :, :n]
