"""Small process-level helpers shared by the command-line tools."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4


def tune_malloc() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse (Linux only).

    PyTorch's CPU allocator hands every large tensor back to the OS when it is
    freed, so the next allocation of the same size page-faults all over again;
    for attention on long sequences that costs 10-30% of the step time. This
    turns off mmap for the main heap (M_MMAP_MAX = 0: tensors of 32 MiB and
    more, such as the feed-forward activations at context 8192, would otherwise
    be mapped and page-faulted afresh each time; a 33 MB add takes 13 ms that
    way against 3 ms from reused memory), and raises the trim threshold to
    1 GiB. Returns True if the settings were applied. Set
    SPARSE_TRANSFORMER_NO_MALLOC_TUNING=1 to turn it off.
    """
    if os.environ.get("SPARSE_TRANSFORMER_NO_MALLOC_TUNING") or not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        return False
    return bool(ok)


def reset_peak_rss() -> bool:
    """Reset the peak resident set size (Linux: /proc/self/clear_refs). True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def precise_malloc() -> bool:
    """Make resident memory follow live memory (Linux, glibc): for memory measurements.

    Every allocation of 64 KiB or more gets its own mapping, returned to the OS
    when freed, so peak RSS is not inflated by memory malloc keeps for reuse.
    Slower; use only in a process that measures memory.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        return bool(name and ctypes.CDLL(name).mallopt(_M_MMAP_THRESHOLD, 64 * 1024))
    except (OSError, AttributeError):
        return False


def proc_kib(path: str, key: str) -> int | None:
    """The kB figure of line ``key:`` of a /proc file (Linux), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """The peak resident set size of this process (since the last reset_peak_rss on Linux)."""
    hwm = proc_kib("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path):
    """Open ``path`` for binary writing so that a crash leaves the old file or the new one.

    Yields a temporary file in the same folder; on success it is flushed,
    fsynced and renamed over ``path``, and the folder is fsynced. On an error
    the temporary file is removed and ``path`` is untouched.
    """
    import tempfile
    from pathlib import Path

    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the user's usual mode
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Make the entries of ``folder`` (a file renamed into it, a new subfolder) durable; best effort."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def make_dirs(folder) -> None:
    """mkdir -p that also fsyncs each new folder into its parent, so a crash cannot lose it."""
    from pathlib import Path

    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    for p in reversed(missing):
        fsync_dir(p.parent)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def cpu_description() -> str:
    """The CPU's model, its ISA flags that matter here, and PyTorch's capability, in one line."""
    import platform

    import torch

    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == (platform.processor() or platform.machine()):
                    model = value.strip()
                elif key.strip() in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    keep = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "asimd", "bf16", "sve"]
    shown = " ".join(f for f in keep if f in flags)
    return f"{model} [{shown or 'flags unknown'}], torch capability {torch.backends.cpu.get_cpu_capability()}"


def compiler_trusted() -> bool:
    """Whether code compiled by torch.compile (inductor) is trusted on this CPU: where PyTorch runs at
    AVX512, as tested. Under ``ATEN_CPU_CAPABILITY=avx2`` torch 2.13's inductor, on the AVX-512 machine
    where this was tested, returned wrong counts for some predicates, crashed and later hung inside
    the compiled decoding step; so AVX2, and the untested arm64, run eagerly (with one warning where
    compiling was asked for)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().upper().startswith("AVX512")
