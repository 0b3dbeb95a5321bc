"""``sparse-transformer bench train``: the time and memory of one training step (sections 5.4, 7).

One step = forward + backward + AdamW update on a batch of random bytes, for
the same model with dense, strided and fixed attention. Each case runs in a
fresh process on the CPU. Memory is measured in another fresh process whose
malloc returns freed memory at once (``sysutil.precise_malloc``), so peak
resident memory follows live tensors; it is counted from before the model is
built.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import time

import torch

from ..model import ModelConfig, SparseTransformer
from ..sysutil import current_rss_bytes, peak_rss_bytes, precise_malloc, reset_peak_rss, tune_malloc
from .common import machine_info, sync, table


def measure(case: dict) -> dict:
    if case.get("memory"):
        precise_malloc()
    elif case["malloc_tuning"]:
        tune_malloc()
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    # Memory is counted from before the model exists: weights, gradients, AdamW
    # state and activations. "activations" subtracts 16 bytes per parameter
    # (float32 weight, gradient and two moments).
    torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool first
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = current_rss_bytes()
    torch.manual_seed(0)
    cfg = ModelConfig(**case["model"])
    model = SparseTransformer(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, 256, (case["batch"], cfg.n_ctx), device=device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16}[case["precision"]]

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            _, loss = model(x, targets=x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm up, and create the optimizer state
    times = []
    for _ in range(case["repeat"]):
        sync(device)
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    times.sort()
    n = model.num_params()
    step_s = times[len(times) // 2] if times else None
    return {"step_s": step_s, "peak_mb": peak / 2**20, "activations_mb": (peak - 16 * n) / 2**20, "parameters": n}


def _run(case: dict) -> dict:
    if case["device"] != "cpu":
        return measure(case)
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (case,))


def run(
    *, n_ctx: int = 8192, layers: list[int] = (8,), d_model: int = 256, n_head: int = 4, batch: int = 1,
    patterns: list[str] = ("dense", "strided", "fixed"), stride: int | None = None, c: int = 16,
    recompute: bool = False, precision: str = "float32", device: str = "cpu", repeat: int = 3,
    malloc_tuning: bool = True, progress=print,
) -> dict:
    stride = stride or 2 ** round(math.log2(math.sqrt(n_ctx)))
    rows = []
    for n_layer in layers:
        dense = None
        for pattern in patterns:
            model = dict(n_ctx=n_ctx, d_model=d_model, n_layer=n_layer, n_head=n_head, pattern=pattern,
                         stride=stride, c=min(c, stride), recompute=recompute)
            case = {"model": model, "batch": batch, "precision": precision, "device": device, "repeat": repeat,
                    "threads": torch.get_num_threads(), "malloc_tuning": malloc_tuning}
            row = {"n_layer": n_layer, "pattern": pattern, "stride": stride, "recompute": recompute, **_run(case)}
            if device == "cpu":  # memory from a separate process where RSS follows live memory
                mem = _run({**case, "memory": True, "repeat": 0})
                row.update(peak_mb=mem["peak_mb"], activations_mb=mem["activations_mb"])
            row["tokens_per_s"] = batch * n_ctx / row["step_s"]
            if pattern == "dense":
                dense = row
            elif dense is not None:
                row["speedup"] = dense["step_s"] / row["step_s"]
            rows.append(row)
            progress(f"{n_layer} layers, {pattern}: {row['step_s']:.3f} s/step, peak {row['peak_mb']:.0f} MB")
    return {
        "benchmark": "train",
        "config": {"n_ctx": n_ctx, "d_model": d_model, "n_head": n_head, "batch": batch, "c": c,
                   "precision": precision, "device": device, "malloc_tuning": malloc_tuning},
        "machine": machine_info(torch.device(device)),
        "results": rows,
    }


COLUMNS = [("n_layer", "layers"), ("pattern", "pattern"), ("stride", "stride"), ("recompute", "recompute"),
           ("parameters", "params"), ("step_s", "s/step"), ("tokens_per_s", "tokens/s"), ("speedup", "speedup"),
           ("peak_mb", "peak MB"), ("activations_mb", "activations MB")]


def report(result: dict) -> str:
    c = result["config"]
    head = f"training step: context {c['n_ctx']}, d {c['d_model']}, {c['n_head']} heads, batch {c['batch']}, {c['precision']} on {c['device']}"
    return head + "\n" + table(result["results"], COLUMNS)
