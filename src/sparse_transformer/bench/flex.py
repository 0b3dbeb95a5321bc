"""``bench attention --against flex``: our kernel against PyTorch's FlexAttention, forward only.

FlexAttention has no backward on the CPU, so both sides run the forward, on the same masks in the
same run: its ``torch.compile``d ``flex_attention`` with a ``create_block_mask`` built from the
pattern's own predicate (``Pattern.mask_mod``), at block 128 (its default) and at smaller blocks (16 is
its fastest on this CPU for Fixed(128, 16) at 16k: 0.19 s, against 0.76 s at 8 and 1.1 s at 4). The
description of a pattern (patterns/tiles.py) is timed against ``create_block_mask``, as it runs by
default and, on the CPU at the first block, with its ``_compile=True`` (warm); a pattern described from its
predicate is also timed with that evaluation compiled (warm). Compile time is left out (one warm-up
call). Each case runs in a fresh process where it can (see attention.py).
"""
from __future__ import annotations

import multiprocessing as mp
import time

import torch

from .. import patterns as P
from ..attention import attention
from ..attention import native
from ..sysutil import compiler_trusted
from .common import machine_info, sync, table, time_it

DEFAULT_BLOCKS = (128, 16)


def _fwd_time(fn, device: str = "cpu") -> float:
    """Median of 3 (CUDA: 10) after one warm-up call (which compiles, builds the kernel)."""
    return time_it(fn, torch.device(device), repeat=3 if device == "cpu" else 10, warmup=1)


def _fwd_bwd(fwd, inputs, do):
    def step():
        torch.autograd.grad(fwd(), inputs, do)
    return step


def measure(case: dict) -> dict:
    """Our forward and description build, and FlexAttention's forward and block mask at each block;
    on CUDA forward+backward too (FlexAttention has no CPU backward)."""
    torch.set_num_threads(case["threads"])
    B, H, N, D, pattern = case["B"], case["H"], case["N"], case["D"], case["pattern"]
    dev, dtype = case.get("device", "cpu"), getattr(torch, case.get("dtype", "float32"))
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g).to(dev, dtype) for _ in range(4))
    out: dict = {}
    if dev != "cpu":
        inputs = [t.requires_grad_() for t in (q, k, v)]
        out["ours_fwd_bwd_s"] = _fwd_time(_fwd_bwd(lambda: attention(q, k, v, pattern), inputs, do), device=dev)
    with torch.no_grad():
        out["ours_fwd_s"] = _fwd_time(lambda: attention(q, k, v, pattern), device=dev)
        tile = native.query_tile(native.padded_dim(D)) if native.available(native.padded_dim(D)) else 32
        t = time.perf_counter()
        pattern.tiles(N, tile)
        out["ours_build_s"] = time.perf_counter() - t
        if pattern.from_predicate and compiler_trusted():
            out["ours_build_compiled_s"] = _compiled_build(pattern, N, tile)
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            return {**out, "flex_error": f"FlexAttention is not in this torch: {e}"}
        flex = torch.compile(flex_attention, dynamic=False)
        ref = attention(q, k, v, pattern)
        mask_mod = pattern.mask_mod(N, dev)

        def mm(b, h, qi, ki):  # one function for every call: compiled, a new one would compile again
            return mask_mod(qi, ki)
        for bs in case["blocks"]:
            try:
                t = time.perf_counter()
                bm = create_block_mask(mm, None, None, N, N,
                                       device=dev, BLOCK_SIZE=bs)
                sync(torch.device(dev))
                out[f"flex{bs}_mask_s"] = time.perf_counter() - t
                if bs == case["blocks"][0] and dev == "cpu":  # its compiled builder, warm (CPU: GPU minutes are few)
                    out[f"flex{bs}_mask_compiled_s"] = _fwd_time(lambda: create_block_mask(
                        mm, None, None, N, N, device=dev, BLOCK_SIZE=bs, _compile=True), device=dev)
                out[f"flex{bs}_fwd_s"] = _fwd_time(lambda: flex(q, k, v, block_mask=bm), device=dev)
                out[f"flex{bs}_err"] = float((flex(q, k, v, block_mask=bm) - ref).abs().max())
                if dev != "cpu":
                    with torch.enable_grad():
                        out[f"flex{bs}_fwd_bwd_s"] = _fwd_time(
                            _fwd_bwd(lambda: flex(q, k, v, block_mask=bm), inputs, do), device=dev)
            except Exception as e:  # noqa: BLE001 - whatever stops FlexAttention is the finding
                out[f"flex{bs}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return out


def _compiled_build(pattern, n: int, tile: int) -> float:
    """Seconds to describe a predicate pattern with its evaluation compiled (predicate.py), warm: the
    first call compiles (seconds), the second is timed. By default it is compiled only from
    COMPILE_FROM positions on."""
    from ..patterns import predicate

    old, predicate.COMPILE_FROM = predicate.COMPILE_FROM, 0
    try:
        pattern.tiles(n, tile)
        t = time.perf_counter()
        pattern.tiles(n, tile)
        return time.perf_counter() - t
    finally:
        predicate.COMPILE_FROM = old


def _run_case(case: dict) -> dict:
    p = case["pattern"]
    if type(p).__module__.startswith("sparse_transformer.patterns.") and not isinstance(p, P.Custom):
        with mp.get_context("spawn").Pool(1) as pool:
            return pool.apply(measure, (case,))
    return measure(case)


def run(ns: list[int], cases: str, *, B: int = 1, H: int = 4, D: int = 64,
        blocks: tuple[int, ...] = DEFAULT_BLOCKS, device: str = "cpu", dtype: str = "float32", progress=print) -> dict:
    """Every sparse case of ``cases`` (the specs of ``bench attention --cases``) at every N."""
    from .attention import parse_cases

    for n in ns:
        parse_cases(cases, n)  # fail early on a bad spec
    rows = []
    for n in ns:
        for name, pattern in parse_cases(cases, n):
            if pattern is None:
                continue  # dense: FlexAttention's causal mask is dense SDPA's job
            case = {"B": B, "H": H, "N": n, "D": D, "pattern": pattern, "blocks": list(blocks),
                    "threads": torch.get_num_threads(), "device": device, "dtype": dtype}
            row = {"N": n, "case": name, **_run_case(case)}
            for bs in blocks:
                if f"flex{bs}_fwd_s" in row:
                    row[f"vs_flex{bs}"] = row[f"flex{bs}_fwd_s"] / row["ours_fwd_s"]
                    row[f"build_vs_flex{bs}"] = row[f"flex{bs}_mask_s"] / row["ours_build_s"]
                    ours = row.get("ours_build_compiled_s", row["ours_build_s"])  # our best build
                    if "ours_build_compiled_s" in row:
                        row[f"cbuild_vs_flex{bs}"] = row[f"flex{bs}_mask_s"] / ours
                    if f"flex{bs}_mask_compiled_s" in row:
                        row[f"build_vs_flexc{bs}"] = row[f"flex{bs}_mask_compiled_s"] / ours
                if f"flex{bs}_fwd_bwd_s" in row:
                    row[f"fb_vs_flex{bs}"] = row[f"flex{bs}_fwd_bwd_s"] / row["ours_fwd_bwd_s"]
            rows.append(row)
            progress(f"N={n} {name}: ours {row['ours_fwd_s']:.4g} s" + "".join(
                f", flex@{bs} {row.get(f'flex{bs}_fwd_s', float('nan')):.4g} s" for bs in blocks))
    return {"benchmark": "attention-vs-flex", "config": {"B": B, "H": H, "D": D, "dtype": dtype, "device": device,
            "blocks": list(blocks)}, "machine": machine_info(torch.device(device)), "results": rows}


def report(result: dict) -> str:
    blocks = result["config"]["blocks"]
    cols = [("N", "N"), ("case", "case"), ("ours_fwd_s", "ours fwd s")]
    for bs in blocks:
        cols += [(f"flex{bs}_fwd_s", f"flex@{bs} fwd s"), (f"vs_flex{bs}", f"x vs @{bs}")]
    if any("ours_fwd_bwd_s" in r for r in result["results"]):
        cols += [("ours_fwd_bwd_s", "ours fwd+bwd s")]
        for bs in blocks:
            cols += [(f"flex{bs}_fwd_bwd_s", f"flex@{bs} fwd+bwd s"), (f"fb_vs_flex{bs}", f"x vs @{bs}")]
    cols += [("ours_build_s", "our description s")]
    compiled = any("ours_build_compiled_s" in r for r in result["results"])
    if compiled:
        cols += [("ours_build_compiled_s", "compiled, warm s")]
    for bs in blocks:
        cols += [(f"flex{bs}_mask_s", f"block mask @{bs} s"), (f"build_vs_flex{bs}", f"x vs @{bs}")]
        if compiled:
            cols += [(f"cbuild_vs_flex{bs}", "x compiled")]
        if any(f"flex{bs}_mask_compiled_s" in r for r in result["results"]):
            cols += [(f"flex{bs}_mask_compiled_s", f"@{bs} _compile=True, warm s"), (f"build_vs_flexc{bs}", "x")]
    c = result["config"]
    where = result["machine"].get("gpu") or result["machine"].get("cpu", "cpu")
    scope = "forward and forward+backward" if c.get("device", "cpu") != "cpu" else "forward only (no CPU backward)"
    head = (f"{scope}: B={c['B']} H={c['H']} D={c['D']} {c.get('dtype', 'float32')} on {where}; "
            "torch.compile'd flex_attention with create_block_mask and the pattern's element mask_mod")
    errors = sorted({f"  {r['case']} @{k[4:-6]}: {v}" for r in result["results"] for k, v in r.items()
                     if k.endswith("_error")})
    return head + "\n" + table(result["results"], cols) + ("\nFlexAttention failed:\n" + "\n".join(errors) if errors else "")
