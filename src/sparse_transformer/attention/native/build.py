"""Building and loading the fused CPU kernel (``kernel.c``, section 5.5).

The C source ships with the package and is compiled on first use with the
system's C compiler (``$CC``, else ``cc``), one library per head width, cached
in ``$SPARSE_TRANSFORMER_CACHE`` (default ``~/.cache/sparse_transformer``).
Compiling takes about a second.

The instruction set follows PyTorch's CPU capability
(``torch.backends.cpu.get_cpu_capability()``, which honours
``ATEN_CPU_CAPABILITY``), so the whole stack runs at one level:

==============  ===============================  ====================
capability      compiler flags                   vector, registers
==============  ===============================  ====================
AVX512 (x86)    ``-march=native``                16 floats, 32
AVX2 (x86)      ``-mavx2 -mfma -mtune=native``   8 floats, 16
arm64           ``-mcpu=native``                 4 floats (NEON), 32
anything else   none                             4 floats
==============  ===============================  ====================

``ATEN_CPU_CAPABILITY=avx2`` on an AVX-512 machine thus builds and runs the
AVX2 kernel, as a machine without AVX-512 would. On macOS, OpenMP comes from
the libomp that PyTorch ships (``-Xpreprocessor -fopenmp -lomp``).

When there is no compiler, or the build fails, ``load`` warns once and returns
None, and the attention runs on the fused-SDPA decomposition instead (exact,
2-10x slower for Strided(128) and Fixed(128, 16) at N=16384). Set ``SPARSE_TRANSFORMER_NATIVE=0``
to turn the kernel off.

The kernel computes in float32 (other dtypes are converted by the caller) on
head widths that are multiples of 16 (the caller pads others with zeros).
It reads a pattern through its description (``patterns/tiles.py``: key intervals per
tile of queries, plus strided's transposed layout), built for the kernel's query tile;
``ops.py`` registers it as PyTorch operators.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernel.c")
# kernel.c includes the other .c files of this folder: all of them make the build key
PARTS = sorted(SOURCE.parent.glob("*.c"))
BASE_FLAGS = ["-O3", "-shared", "-fPIC", "-std=gnu11"]

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


def target(machine: str | None = None, capability: str | None = None) -> tuple[str, list[str]]:
    """(name, instruction-set flags) of the build: follows PyTorch's CPU capability (see the module doc)."""
    machine = (machine or platform.machine()).lower()
    capability = (capability or torch.backends.cpu.get_cpu_capability()).upper()
    if machine in ("x86_64", "amd64", "x86", "i686", "i386"):
        if capability.startswith("AVX512"):
            return "avx512", ["-march=native"]
        if capability == "AVX2":
            return "avx2", ["-mavx2", "-mfma", "-mtune=native"]
        return "x86", []
    if machine in ("arm64", "aarch64"):
        return "neon", ["-mcpu=native"]
    return machine or "generic", []


def _openmp_flags() -> list[str]:
    if sys.platform == "darwin":  # Apple clang: no -fopenmp driver flag; link PyTorch's own libomp
        lib = Path(torch.__file__).with_name("lib")
        return ["-Xpreprocessor", "-fopenmp", f"-L{lib}", "-lomp", f"-Wl,-rpath,{lib}"]
    return ["-fopenmp"]


def build_flags(head_dim: int) -> list[str]:
    return BASE_FLAGS + target()[1] + _openmp_flags() + [f"-DHD={head_dim}"]


def _key(cc: str, flags: list[str]) -> str:
    parts = [*(p.read_text() for p in PARTS), cc, *flags, platform.machine(), _cpu_flags()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def library_path(head_dim: int) -> tuple[str, list[str], Path]:
    """(compiler, flags, cached library path) for ``head_dim``; the name carries the build key."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC)")
    flags = build_flags(head_dim)
    name = f"native-{target()[0]}-hd{head_dim}-{_key(cc, flags)}.so"
    return cc, flags, cache_dir() / name


def _build(head_dim: int) -> Path:
    """Compile (or find in the cache) the library for ``head_dim``; raises on failure."""
    cc, flags, out = library_path(head_dim)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if res.returncode != 0:
            err = res.stderr.strip().splitlines()
            raise RuntimeError(f"{cc} failed: {err[-1] if err else res.returncode}")
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
        lib.st_vector_width.restype = i
        lib.st_tiles_forward.argtypes = [i] * 5 + [ptr] * 4 + [i, i, i, i, f, i] + [ptr] * 5
        lib.st_tiles_backward.argtypes = [i] * 5 + [ptr] * 4 + [i, i, i, i, f, i] + [ptr] * 9
        lib.st_decode.argtypes = [i, i, i, ptr, ptr, f, ptr, i]
        lib.st_tiles_forward.restype = lib.st_tiles_backward.restype = lib.st_query_tile.restype = i
        lib.st_decode.restype = i
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warn_once(
            "build",
            f"sparse_transformer: the native CPU attention kernel could not be built ({e}); "
            "falling back to the slower fused-SDPA decomposition",
        )
        lib = None
    _libs[head_dim] = lib
    return lib


@torch.compiler.assume_constant_result
def available(head_dim: int) -> bool:
    """Whether the kernel for ``head_dim`` is built (building it now if need be).

    torch.compile runs this at trace time and keeps the answer as a constant, so
    the first call of a compiled model may build the kernel without a graph break.
    """
    return enabled() and load(head_dim) is not None


def describe(head_dim: int = 64) -> str:
    """One line on the kernel this process runs: instruction set, vector width, or why none."""
    if not enabled():
        return "native kernel off (SPARSE_TRANSFORMER_NATIVE=0)"
    lib = load(head_dim)
    if lib is None:
        return "native kernel unavailable (build failed)"
    name, flags = target()
    return f"native kernel {name} ({lib.st_vector_width()} floats/vector; {' '.join(flags) or 'no ISA flags'})"


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
