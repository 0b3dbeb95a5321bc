"""``sparse-transformer bench attention``: sparse vs dense causal attention (paper section 5.5).

For each N, three cases run in the same invocation:
  dense    torch's scaled_dot_product_attention(is_causal=True), the baseline
  strided  Strided(l) with l the power of two nearest sqrt(N)
  fixed    Fixed(128, 16)
Each is timed forward and forward+backward, and its peak memory measured in
a fresh process (CPU: resident memory above the inputs; CUDA: allocated
memory above the inputs). FLOP rates count only the pattern's allowed pairs
(4 * D flops per pair forward; the backward counted as 2.5 forwards) and are
compared with a 2048^3 matrix product (8192^3 on CUDA) timed in turns with each
case's forward+backward, in its process: on a shared host whose speed drifts
by tens of percent from minute to minute, both then see the same moments.
"""
from __future__ import annotations

import math
import time
import multiprocessing as mp

import torch
import torch.nn.functional as F

from .. import patterns as P
from ..attention import attention
from ..attention.api import explain_path
from ..sysutil import current_rss_bytes, peak_rss_bytes, reset_peak_rss, tune_malloc
from .common import machine_info, matmul_product, matmul_rate, sync, table, time_interleaved, time_it

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


DEFAULT_CASES = "dense,strided,fixed:128:16"


def parse_cases(spec: str, n: int) -> list[tuple[str, P.Pattern | None]]:
    """Cases from a comma list of pattern specs (``patterns.parse``: strided:l, fixed:l:c, local:w, ...),
    with three shorthands: ``dense`` (the causal SDPA baseline), ``strided`` (l = the power of two nearest
    sqrt(N)) and ``fixed`` or ``fixed:l`` (l = 128, c = min(16, l))."""
    cases: list[tuple[str, P.Pattern | None]] = []
    for item in spec.split(","):
        item = item.strip()
        name, *args = item.split(":")
        if item == "dense":
            cases.append(("dense", None))
        elif item == "strided":
            cases.append((item, P.Strided(2 ** round(math.log2(math.sqrt(n))))))
        elif name == "fixed" and len(args) <= 1:
            try:
                stride = int(args[0]) if args else 128
            except ValueError:
                raise ValueError(f"bad case {item!r}: parameters must be integers") from None
            cases.append((item, P.Fixed(stride, min(16, stride))))
        else:
            try:
                cases.append((item, P.parse(item)))
            except ValueError as e:
                raise ValueError(f"bad case {item!r}: {e}") from None
    return cases


def _repeats(fn, device) -> int:
    """Runs fn twice (warm-ups: the first may compile, as FlexAttention does on CUDA) and says from the
    second how many timed runs it deserves: 20 when one takes < 50 ms, 5 when < 2 s, 3 when < 10 s, else 1."""
    fn()
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    second = time.perf_counter() - t
    return 20 if second < 0.05 else 5 if second < 2 else 3 if second < 10 else 1


def _timed(fn, device) -> float:
    """Median after two warm-up runs (``_repeats``)."""
    return time_it(fn, device, repeat=_repeats(fn, device), warmup=0)


def measure(case: dict) -> dict:
    """Run one case (in a child process on the CPU so that peak memory is its own)."""
    if case.get("malloc_tuning"):
        tune_malloc()
    torch.set_num_threads(case["threads"])
    device = torch.device(case["device"])
    dtype = DTYPES[case["dtype"]]
    B, H, N, D = case["B"], case["H"], case["N"], case["D"]
    pattern = case["pattern"]
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)

    if pattern is None:
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    else:
        fwd = lambda: attention(q, k, v, pattern)  # noqa: E731

    def fwd_bwd():
        o = fwd()
        o.backward(do)
        q.grad = k.grad = v.grad = None

    # Initialise thread pools and kernels on a small problem first (on CUDA the whole one: FlexAttention
    # compiles a graph per length), so their one-time buffers do not count as this case's memory.
    small = [t.detach()[:, :, : 256 if device.type == "cpu" else N].clone().requires_grad_(True) for t in (q, k, v)]
    o = F.scaled_dot_product_attention(*small, is_causal=True) if pattern is None else attention(*small, pattern)
    o.sum().backward()
    del small, o
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
        base = current_rss_bytes()
    with torch.no_grad():
        t_fwd = _timed(fwd, device)
    peak_fwd = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    repeat = _repeats(fwd_bwd, device)
    peak_fb = (torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()) - base
    # fwd+bwd in turns with the reference matrix product: "of matmul" compares the same moments
    product, product_flops = matmul_product(device, dtype)
    t_fb, t_mm = time_interleaved(fwd_bwd, product, device, repeat)
    path = "sdpa(is_causal=True)" if pattern is None else explain_path(q, pattern)
    return {"fwd_s": t_fwd, "fwd_bwd_s": t_fb, "peak_fwd_mb": peak_fwd / 2**20, "peak_fwd_bwd_mb": peak_fb / 2**20,
            "path": path, "matmul_rate": product_flops / t_mm}


def _run_case(case: dict) -> dict:
    """On the CPU, in a fresh process when the pattern can be rebuilt there (a pattern of the package);
    a pattern defined by the caller (a Custom one, a class in a user's file) runs in this process,
    and its peak memory then includes what the process held before."""
    p = case["pattern"]
    portable = p is None or (type(p).__module__.startswith("sparse_transformer.patterns.") and not isinstance(p, P.Custom))
    if case["device"] != "cpu" or not portable:
        return {**measure(case), **({} if portable else {"note": "measured in this process"})}
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(measure, (case,))


def run(
    ns: list[int],
    *,
    B: int = 1,
    H: int = 4,
    D: int = 64,
    dtype: str = "float32",
    device: str = "cpu",
    cases: str = DEFAULT_CASES,
    max_dense_n: int | None = None,
    malloc_tuning: bool = True,
    progress=print,
) -> dict:
    dev = torch.device(device)
    for n in ns:
        parse_cases(cases, n)  # fail early on a bad spec
    rate = matmul_rate(dev, DTYPES[dtype])
    rows = []
    for n in ns:
        dense_s = None
        for name, pattern in parse_cases(cases, n):
            pairs = n * (n + 1) // 2 if pattern is None else pattern.num_pairs(n)
            row = {
                "N": n, "case": name, "pattern": "sdpa(is_causal=True)" if pattern is None else repr(pattern),
                "pairs": pairs, "density": pairs / (n * (n + 1) / 2),
            }
            if pattern is None and max_dense_n is not None and n > max_dense_n:
                row["skipped"] = f"dense skipped above N={max_dense_n}"
                rows.append(row)
                progress(f"N={n} {name}: skipped")
                continue
            case = {
                "B": B, "H": H, "N": n, "D": D, "dtype": dtype, "device": device, "pattern": pattern,
                "threads": torch.get_num_threads(), "malloc_tuning": malloc_tuning,
            }
            row.update(_run_case(case))
            flops = 4 * B * H * pairs * D
            row["fwd_tflops"] = flops / row["fwd_s"] / 1e12
            row["fwd_bwd_tflops"] = 3.5 * flops / row["fwd_bwd_s"] / 1e12
            row["fraction_of_matmul"] = 3.5 * flops / row["fwd_bwd_s"] / row["matmul_rate"]
            if pattern is None:
                dense_s = row
            elif dense_s is not None:
                row["fwd_speedup"] = dense_s["fwd_s"] / row["fwd_s"]
                row["fwd_bwd_speedup"] = dense_s["fwd_bwd_s"] / row["fwd_bwd_s"]
            rows.append(row)
            progress(f"N={n} {name}: fwd {row['fwd_s']:.4g} s, fwd+bwd {row['fwd_bwd_s']:.4g} s")
    return {
        "benchmark": "attention",
        "config": {"B": B, "H": H, "D": D, "dtype": dtype, "device": device, "malloc_tuning": malloc_tuning},
        "machine": machine_info(dev),
        "matmul_tflops": rate / 1e12,
        "results": rows,
    }


COLUMNS = [
    ("N", "N"), ("case", "case"), ("pattern", "pattern"), ("density", "density"),
    ("fwd_s", "fwd s"), ("fwd_bwd_s", "fwd+bwd s"), ("peak_fwd_bwd_mb", "peak MB"),
    ("fwd_speedup", "fwd x"), ("fwd_bwd_speedup", "fwd+bwd x"),
    ("fwd_bwd_tflops", "TFLOP/s"), ("fraction_of_matmul", "of matmul"),
]


def report(result: dict) -> str:
    head = (
        f"attention benchmark: B={result['config']['B']} H={result['config']['H']} D={result['config']['D']} "
        f"{result['config']['dtype']} on {result['machine'].get('gpu', result['machine'].get('cpu', 'cpu'))}; "
        f"matmul {result['matmul_tflops']:.3g} TFLOP/s"
    )
    paths = sorted({f"  {r['case']}: {r['path']}" for r in result["results"] if r.get("path")})
    return head + "\n" + table(result["results"], COLUMNS) + "\npaths:\n" + "\n".join(paths)
