"""``bench length``: the longest sequence whose training step fits a memory budget (the paper's Table 4).

For each pattern, with and without recomputation (section 5.4), the context
length is doubled until one training step (forward, backward, AdamW) needs
more than the budget, then bisected. Every trial runs in a fresh process whose
peak memory follows live tensors (see bench/train.py); on CUDA the budget is
compared with the peak of allocated memory.
"""
from __future__ import annotations

import math

import torch

from .common import machine_info, table
from .train import _run


def _fits(n: int, pattern: str, recompute: bool, *, budget_mb: float, model: dict, batch: int, device: str,
          cache: dict) -> tuple[bool, float]:
    key = (n, pattern, recompute)
    if key not in cache:
        stride = 2 ** max(1, round(math.log2(math.sqrt(n))))
        cfg = dict(model, n_ctx=n, pattern=pattern, stride=stride, c=min(model.get("c", 16), stride), recompute=recompute)
        case = {"model": cfg, "batch": batch, "precision": "float32", "device": device, "repeat": 0,
                "threads": torch.get_num_threads(), "malloc_tuning": False, "memory": True}
        peak = _run(case)["peak_mb"]
        cache[key] = (peak <= budget_mb, peak)
    return cache[key]


def run(*, budget_mb: float = 1024, patterns=("dense", "strided", "fixed"), recompute=(False, True),
        start: int = 1024, max_n: int = 1 << 20, steps: int = 3, d_model: int = 64, n_layer: int = 4,
        n_head: int = 2, batch: int = 1, device: str = "cpu", progress=print) -> dict:
    """``steps`` bisection steps after the doubling (the answer is within start * 2**k / 2**steps)."""
    model = {"d_model": d_model, "n_layer": n_layer, "n_head": n_head}
    rows = []
    for pattern in patterns:
        for rc in recompute:
            cache: dict = {}
            kw = dict(budget_mb=budget_mb, model=model, batch=batch, device=device, cache=cache)
            lo, hi = 0, start
            while hi <= max_n and _fits(hi, pattern, rc, **kw)[0]:
                lo, hi = hi, hi * 2
            if lo and hi <= max_n:  # bisect between the last fitting and the first failing length
                for _ in range(steps):
                    mid = (lo + hi) // 2
                    if _fits(mid, pattern, rc, **kw)[0]:
                        lo = mid
                    else:
                        hi = mid
            peak = cache[(lo, pattern, rc)][1] if lo else None
            row = {"pattern": pattern, "recompute": rc, "max_n": lo or None, "peak_mb_at_max": peak,
                   "first_failing_n": hi if hi <= max_n else None, "trials": len(cache)}
            rows.append(row)
            progress(f"{pattern}, recompute {rc}: longest fitting context {lo or '< ' + str(start)} "
                     f"({len(cache)} trials)")
    return {"benchmark": "length", "config": {"budget_mb": budget_mb, "batch": batch, "device": device, **model,
            "stride": "power of two nearest sqrt(n)", "bisection_steps": steps},
            "machine": machine_info(torch.device(device)), "results": rows}


def report(result: dict) -> str:
    c = result["config"]
    head = (f"length: budget {c['budget_mb']:.0f} MB, {c['n_layer']} layers, d {c['d_model']}, {c['n_head']} heads, "
            f"batch {c['batch']} on {c['device']}")
    cols = [("pattern", "pattern"), ("recompute", "recompute"), ("max_n", "longest n"), ("peak_mb_at_max", "peak MB"),
            ("first_failing_n", "first too long"), ("trials", "trials")]
    return head + "\n" + table(result["results"], cols)
