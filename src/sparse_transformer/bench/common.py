"""Timing and reporting helpers shared by the benchmarks."""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeat: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_product(device: torch.device, dtype: torch.dtype):
    """(a function computing one square matrix product, its FLOPs): the reference of "of matmul"."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: a @ b), 2 * n**3


def matmul_rate(device: torch.device, dtype: torch.dtype, repeat: int = 5) -> float:
    """FLOP/s of a square matrix product, measured now on this device."""
    product, flops = matmul_product(device, dtype)
    return flops / time_it(product, device, repeat)


def time_interleaved(fn, ref, device: torch.device, repeat: int, block: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn()`` and ``ref()``, run in turns ``repeat`` times each (after one
    warm-up of ``ref``), so that on a shared, noisy host the ratio of the two sees the same moments.

    ``block`` > 1: each turn runs one untimed call and then times ``block`` calls in a row (the time of
    one is their mean), so that each is measured as it runs back to back with itself, not right after
    the other (decoding steps: a dense-cache step streams hundreds of MB, which evicts the weights
    that the next step of a sparse cache would otherwise find in the CPU's last-level cache)."""
    ref()
    sync(device)
    times: tuple[list, list] = ([], [])
    for _ in range(repeat):
        for f, out in ((fn, times[0]), (ref, times[1])):
            if block > 1:
                f()
                sync(device)
            t = time.perf_counter()
            for _ in range(block):
                f()
            sync(device)
            out.append((time.perf_counter() - t) / block)
    return statistics.median(times[0]), statistics.median(times[1])


def machine_info(device: torch.device) -> dict:
    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        from ..sysutil import cpu_description

        info["cpu"] = cpu_description()
    try:
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def write_json(obj: dict, path: str | None) -> None:
    """Write ``obj`` as JSON to ``path`` atomically, or to stdout when path is "-"."""
    text = json.dumps(obj, indent=2)
    if path == "-":
        print(text)
        return
    from ..sysutil import atomic_write_text

    atomic_write_text(Path(path), text + "\n")


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain text table: columns are (key, header)."""
    cells = [[h for _, h in columns]] + [[_fmt(r.get(k)) for k, _ in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
