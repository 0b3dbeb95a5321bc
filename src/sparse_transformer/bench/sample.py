"""``sparse-transformer bench sample``: decoding with the pattern-following KV cache (not in the paper).

- Time per token at two or more positions (default 1,024 and 16,384): one ``model.step``
  at position t, median of repeats, with the cache allocated for the longest
  position (the cost of a step depends on t, not on the cache's contents).
- Generating L tokens (default 4,096) with the cache, timed, against
  recomputing the full forward pass for every token. The latter is estimated
  from forward passes timed at 8 lengths and integrated over 1..L (trapezoid
  rule), because running it takes tens of minutes on a CPU.
- Prefill of a prompt as long as the longest position: ``model(x, cache=cache)``
  (the sparse forward that also fills the caches) against one plain forward
  pass of the same length.
- Tokens per second at the longest position: n = 1 and n = 8 samples (one step serves all n),
  and n = 1 against a dense KV-cache baseline: the same model and weights, each step attending
  every cached position with ``scaled_dot_product_attention`` (``model.new_cache(1, dense=True)``),
  the two steps timed in turns (medians), so that the ratio sees the same moments of a shared host.
  Each turn is one untimed step and then BLOCK steps in a row, as ``generate`` runs them: timed one at
  a time in turns, a step of the sparse cache ran right after a dense one that had evicted its
  weights from the last-level cache, 0.5-0.8 ms slower than in any generation (BENCHMARKS.md).
- KV cache bytes at the longest position, against a dense cache.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ..model import ModelConfig, SparseTransformer
from ..attention.kv_cache import ModelCache
from ..model.generate import compiled_step, generate
from ..sysutil import compiler_trusted, tune_malloc
from .common import machine_info, table, time_interleaved

BLOCK = 4  # steps timed in a row in each turn of the comparison with the dense-cache baseline


def run(*, positions=(1024, 16384), gen_length: int = 4096, n_layer: int = 8, d_model: int = 256, n_head: int = 4,
        stride: int = 128, c: int = 16, patterns=("dense", "strided", "fixed"), repeat: int = 20,
        malloc_tuning: bool = True, compile: bool = False, progress=print) -> dict:
    if malloc_tuning:
        tune_malloc()
    if compile and not compiler_trusted():
        progress(f"--compile skipped: compiled code is not trusted at {torch.backends.cpu.get_cpu_capability()} "
                 "(sysutil.compiler_trusted)")
        compile = False
    torch.manual_seed(0)
    n_ctx = max(max(positions) + 1, gen_length)
    rows = []
    dense_cache = None
    for pattern in patterns:
        cfg = ModelConfig(n_ctx=n_ctx, d_model=d_model, n_layer=n_layer, n_head=n_head, pattern=pattern, stride=stride, c=c)
        model = SparseTransformer(cfg).eval()
        cache = model.new_cache(1)
        row = {"pattern": pattern, "cache_mb": model.cache_bytes(cache) / 2**20}
        if pattern == "dense":
            dense_cache = row["cache_mb"]
        for t in positions:
            row[f"ms_at_{t}"] = _step_ms(model, cache, t, repeat)
        last = positions[-1]
        row["step_ratio"] = row[f"ms_at_{last}"] / row[f"ms_at_{positions[0]}"]
        row["tok_s_n1"] = 1000 / row[f"ms_at_{last}"]
        row["tok_s_n8"] = 8 * 1000 / _step_ms(model, model.new_cache(8), last, repeat)
        prev, dense = torch.zeros(1, dtype=torch.long), model.new_cache(1, dense=True)
        model.step(prev, last, dense)  # warm-up
        # the pattern's step and the dense-cache baseline's, timed in turns (the host's speed drifts)
        ours_s, dense_s = time_interleaved(lambda: model.step(prev, last, cache),
                                           lambda: model.step(prev, last, dense), torch.device("cpu"), repeat, BLOCK)
        row["tok_s_dense_cache"] = 1 / dense_s
        row["vs_dense_cache"] = dense_s / ours_s
        if compile:  # the compiled step (static shapes) at every position, against eager
            for t in positions:
                row[f"compiled_ms_at_{t}"] = _step_ms(model, cache, t, repeat, compiled=True)
            row["eager_vs_compiled"] = row[f"ms_at_{positions[0]}"] / row[f"compiled_ms_at_{positions[0]}"]
            row["tok_s_dense_cache_compiled"], row["compiled_vs_dense_cache"] = _compiled_vs_dense(
                model, cache, dense, last, repeat)
        row["forward_s"], row["prefill_s"] = _prefill(model, positions[-1])
        row["prefill_vs_forward"] = row["prefill_s"] / row["forward_s"]
        t0 = time.perf_counter()
        generate(model, 1, gen_length, temperature=1.0, seed=0)
        row["generate_s"] = time.perf_counter() - t0
        lengths = np.unique(np.linspace(1, gen_length, 8).astype(int))
        fwd = []
        with torch.no_grad():
            for n in lengths:
                x = torch.zeros(1, int(n), dtype=torch.long)
                model(x)
                t0 = time.perf_counter()
                model(x)
                fwd.append(time.perf_counter() - t0)
        row["recompute_s_estimate"] = float(np.trapezoid(fwd, lengths))
        row["generate_speedup"] = row["recompute_s_estimate"] / row["generate_s"]
        progress(f"{pattern}: {row['step_ratio']:.2f}x step time, generate {row['generate_s']:.1f} s, "
                 f"{row['generate_speedup']:.0f}x faster than recomputing")
        rows.append(row)
    for row in rows:
        row["cache_fraction_of_dense"] = row["cache_mb"] / dense_cache if dense_cache else None
    return {
        "benchmark": "sample",
        "config": {"n_layer": n_layer, "d_model": d_model, "n_head": n_head, "stride": stride, "c": c,
                   "positions": list(positions), "gen_length": gen_length, "n_ctx": n_ctx},
        "machine": machine_info(torch.device("cpu")),
        "results": rows,
    }


def _compiled_vs_dense(model: SparseTransformer, cache: ModelCache, dense: ModelCache, t: int,
                       repeat: int) -> tuple[float, float]:
    """Both steps compiled, at position t, in turns: (dense-cache baseline tokens/s, how many times
    faster the pattern's step is). Compiling removes per-step overhead from both, so this is the fair
    comparison for the compiled step."""
    prev = torch.zeros(1, dtype=torch.long)
    ours, base = compiled_step(model, cache), compiled_step(model, dense)
    ours(prev, t), base(prev, t)  # compiles (left out of the time)
    ours_s, dense_s = time_interleaved(lambda: ours(prev, t), lambda: base(prev, t), torch.device("cpu"), repeat, BLOCK)
    return 1 / dense_s, dense_s / ours_s


def _step_ms(model: SparseTransformer, cache: ModelCache, t: int, repeat: int, compiled: bool = False) -> float:
    """Median milliseconds of one decoding step at position t (the cost depends on t, not on the contents);
    ``compiled``: of ``generate``'s compiled step (its compile time left out)."""
    B = cache.batch
    prev = torch.zeros(B, dtype=torch.long)
    decode = compiled_step(model, cache) if compiled else None
    step = (lambda: decode(prev, t)) if compiled else (lambda: model.step(prev, t, cache))
    step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


@torch.no_grad()
def _prefill(model: SparseTransformer, n: int) -> tuple[float, float]:
    """(seconds of one forward pass over n positions, seconds of the prefill of n positions)."""
    x = torch.zeros(1, n, dtype=torch.long)
    model(x[:, : min(n, 256)])  # warm-up
    t0 = time.perf_counter()
    model(x)
    forward = time.perf_counter() - t0
    cache = model.new_cache(1)
    t0 = time.perf_counter()
    model(x, cache=cache)
    return forward, time.perf_counter() - t0


def report(result: dict) -> str:
    p = result["config"]["positions"]
    cols = [("pattern", "pattern")] + [(f"ms_at_{t}", f"ms/token at {t}") for t in p] + [
        ("step_ratio", "ratio"), *[(f"compiled_ms_at_{t}", f"compiled at {t}") for t in p],
        ("eager_vs_compiled", "eager/compiled"), ("tok_s_n1", f"tok/s n=1 at {p[-1]}"), ("tok_s_n8", "n=8"),
        ("tok_s_dense_cache", "dense-cache tok/s"), ("vs_dense_cache", "x dense cache"),
        ("tok_s_dense_cache_compiled", "compiled dense-cache tok/s"),
        ("compiled_vs_dense_cache", "x, both compiled"),
        ("prefill_s", f"prefill {p[-1]} s"), ("prefill_vs_forward", "of a forward"),
        ("generate_s", f"generate {result['config']['gen_length']} s"),
        ("recompute_s_estimate", "recompute s (est.)"), ("generate_speedup", "speedup"),
        ("cache_mb", "cache MB"), ("cache_fraction_of_dense", "of dense")]
    c = result["config"]
    head = f"sampling: {c['n_layer']} layers, d {c['d_model']}, {c['n_head']} heads, stride {c['stride']}, c {c['c']}, float32, CPU"
    return head + "\n" + table(result["results"], cols)
