"""``attention(q, k, v, pattern)``: input checks, the choice of path (native kernel, decomposition,
masked SDPA, reference), the dtype policy, and the dispatch (sections 4.3, 5.5)."""
from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..patterns import Dense, Pattern
from . import flex, native
from .heads import by_head_groups, per_head_patterns
from .merge import SparseAttentionFunction
from .sdpa import default_scale, masked_sdpa, select_kernel
from .native import tiles_attention
from .plan import make_plan
from .reference import reference_attention

BACKENDS = ("auto", "reference", "native", "flex", "cpu", "cuda", "math")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Where the native kernel is off or cannot be built, ``auto`` on the CPU runs a sparse pattern below
# this length as one SDPA call with the pattern's mask instead of the decomposition, whose fixed cost
# per part dominates there. Measured fwd+bwd, B8 H4 D32 float32, 2 threads (BENCHMARKS.md, "short
# sequences"): Fixed(16, 4) at 256 positions 7.0 ms masked SDPA vs 8.0 ms decomposition (AVX-512;
# 10.2 vs 11.1 ms AVX2), Fixed(22, 8) at 512 33 vs 20 ms. The native kernel beats dense SDPA from 64
# positions up (Fixed(16, 4): 0.49 vs 0.66 ms; at 256, 1.7 vs 8.5 ms), so it has no such threshold.
MASKED_SDPA_BELOW = 512


def _check_inputs(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3] or q.shape[2] > k.shape[2]:
        raise ValueError(
            "q must be [B, H, L, D] and k, v [B, H, N, D] with L <= N (the queries are the last L positions), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of float32, float64, bfloat16, float16, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if min(q.shape) < 1:
        raise ValueError(f"every dimension of [B, H, L, D] must be >= 1, got {tuple(q.shape)}")


def _use_native(q: torch.Tensor, pats: list[Pattern], backend: str) -> bool:
    """Whether this call runs on the native kernel (saying why not when it was asked for)."""
    if backend not in ("auto", "native"):
        return None
    explicit = backend == "native"
    if q.device.type != "cpu":
        if explicit:
            raise ValueError(f"backend 'native' needs CPU tensors, got device {q.device}")
        return False
    if q.dtype == torch.float64:
        if explicit:
            raise ValueError("backend 'native' computes in float32; float64 runs on backend 'cpu'")
        return False  # float64 keeps its precision on the decomposition
    if any(isinstance(p, Dense) for p in pats):
        if explicit:
            raise ValueError("backend 'native' computes sparse patterns; Dense runs on one causal SDPA call")
        return False  # one fused SDPA call is the fast path for dense attention
    if not native.enabled():
        if explicit:
            raise ValueError("backend 'native' is turned off by SPARSE_TRANSFORMER_NATIVE=0")
        return False
    ok = native.available(native.padded_dim(q.shape[-1]))
    if not ok and explicit:
        raise ValueError("backend 'native': the kernel could not be built (see the warning)")
    return ok


def _use_flex(q: torch.Tensor, pats: list[Pattern], backend: str) -> bool:
    """FlexAttention: when asked for (or a ValueError saying why not), and by default on CUDA."""
    if backend == "flex":
        if not flex.available():
            raise ValueError("backend 'flex' needs torch.nn.attention.flex_attention (PyTorch >= 2.5)")
        if q.dtype == torch.float64:
            raise ValueError("backend 'flex' computes in float32, bfloat16 or float16; float64 runs on backend 'cpu'")
        if any(isinstance(p, Dense) for p in pats):
            raise ValueError("backend 'flex' computes sparse patterns; Dense runs on one causal SDPA call")
        if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            raise ValueError("backend 'flex' on the CPU is forward only (FlexAttention has no CPU backward); "
                             "use backend 'auto' (the native kernel) to train")
        if q.device.type == "cpu" and any(flex.merges(p) for p in pats):
            raise ValueError("backend 'flex' on the CPU runs one layout per pattern: its compiled FlexAttention "
                             "returns no log-sum-exp to merge strided's band and columns; use backend 'auto'")
        return True
    return (backend == "auto" and q.device.type == "cuda" and flex.available() and not flex.failed()
            and q.dtype != torch.float64 and q.shape[-1] >= 16 and not any(isinstance(p, Dense) for p in pats))


def choose_path(q: torch.Tensor, pats: list[Pattern], backend: str) -> str:
    """The path of one call: "reference", "native", "flex", "masked" (one SDPA call with the pattern's
    mask) or "decomposition". ``explain_path`` says why, for the train header and the benchmarks."""
    if backend == "reference":
        return "reference"
    if _use_native(q, pats, backend):
        return "native"
    if _use_flex(q, pats, backend):
        return "flex"
    if (backend == "auto" and q.device.type == "cpu" and q.shape[2] < MASKED_SDPA_BELOW
            and not all(isinstance(p, Dense) for p in pats)):
        return "masked"
    if not all(_decomposable(p) for p in pats):
        return "masked"
    return "decomposition"


@functools.lru_cache(maxsize=None)  # patterns are frozen dataclasses; this runs on every attention call
def _decomposable(p: Pattern) -> bool:
    """Whether the decomposition has a plan for ``p``; a pattern without one (a new pattern file that
    gives only ``allowed``) runs as one SDPA call with its N x N mask, exact but O(N^2), said once."""
    try:
        make_plan(p, 1)
        return True
    except ValueError:
        warnings.warn(f"{type(p).__name__} has no fast decomposition: off the native kernel (float64, CUDA, or the "
                      "kernel off) it runs as one SDPA call with its N x N mask (exact, O(N^2) time and memory)",
                      RuntimeWarning, stacklevel=4)
        return False


def explain_path(q: torch.Tensor, pattern: Pattern | Sequence[Pattern], backend: str = "auto") -> str:
    """One line: which path ``attention(q, q, q, pattern, backend=backend)`` runs, and why."""
    pats = per_head_patterns(pattern, q.shape[1])
    path, N = choose_path(q, pats, backend), q.shape[2]
    if path == "native":
        return native.describe(native.padded_dim(q.shape[-1]))
    if path == "flex":
        return f"FlexAttention, block masks from the pattern's description (block {flex.BLOCK})"
    if path == "decomposition" and all(isinstance(p, Dense) for p in pats):
        return "one causal SDPA call (dense)"
    if path == "masked" and not all(_decomposable(p) for p in pats):
        return "SDPA with the pattern's N x N mask (no decomposition for this pattern; the native kernel is not in use)"
    if path == "masked":
        return f"SDPA with the pattern's mask (N={N} < {MASKED_SDPA_BELOW}: faster than the decomposition here)"
    if path == "decomposition" and q.device.type == "cpu":
        if q.dtype == torch.float64:
            return "fused-SDPA decomposition (float64)"
        if backend == "auto":
            return f"fused-SDPA decomposition ({native.describe(native.padded_dim(q.shape[-1]))})"
    return f"fused-SDPA decomposition ({q.device.type}, backend {backend})" if path == "decomposition" else path


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | Sequence[Pattern],
    *,
    backend: str = "auto",
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention restricted to ``pattern``; q, k, v and the result are [B, H, N, D].

    q may be shorter, [B, H, L, D] with L <= N: the queries are then the last L positions
    N-L..N-1 of the keys (chunked prefill), and the result is [B, H, L, D]. The native kernel
    computes only those rows; the decomposition (float64, CUDA) computes all N and keeps L.

    ``pattern`` is one Pattern for all heads, or a sequence of H patterns (head h
    uses ``pattern[h]``; this is the paper's "multi-head" combination, section 5.1).
    A Fixed pattern with ``distinct_heads`` stands for ``pattern.per_head(H)``: one Fixed per head,
    each with its own summary offsets.

    backend:
      "auto"      the fast path: on the CPU, the native kernel for every sparse pattern, read
                  from its description (float32 math; bfloat16/float16 inputs are computed in
                  float32, float64 stays on the decomposition), one causal SDPA call for Dense;
                  on CUDA, FlexAttention (``flex``; the decomposition if it fails, said once);
                  the decomposition on the "math" kernel, with a warning, elsewhere
      "reference" dense masked softmax, O(N^2): the test oracle
      "native"    the native CPU kernel (``attention/native/kernel.c``), or a ValueError
      "flex"      FlexAttention with block masks built from the description (``attention/flex.py``):
                  the default on CUDA; forward only on the CPU
      "cpu", "cuda", "math"  the decomposition (section 5.5) on that fused kernel

    The fast path never forms an N x N matrix: for strided and fixed patterns
    with stride ~ sqrt(N) it costs O(N sqrt(N)) time and memory.
    Queries with no allowed key (only possible for some factor patterns) give zeros.

    ``scale`` multiplies the scores (default 1/sqrt(D)); it must be finite and > 0, else a ValueError.

    Non-finite inputs are not checked (that would cost a pass over q, k and v). A NaN or inf in a
    key or value makes the output of every query that attends it non-finite, on every path: it is
    never hidden. It is not always confined to those queries: fused kernels multiply a whole tile
    of probabilities, zeros included, by the tile's values, and 0 x NaN is NaN. A non-finite value
    reaches queries within 64 positions of it on the native kernel and the decomposition; on one
    masked SDPA call (``auto`` below 512 positions for patterns without a native pass) and on
    ``reference`` it can reach any query. Training skips steps whose loss or gradient is non-finite.
    """
    _check_inputs(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    H, L, N, D, dtype = q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype
    pats = per_head_patterns(pattern, H)
    if scale is None:
        scale = default_scale(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if backend == "reference":
        return reference_attention(q, k, v, pats, scale)
    path = choose_path(k, pats, backend)  # by the keys' length
    use_native = path == "native"
    # On the CPU, bfloat16/float16 SDPA with masks and gathers is slower than float32 (2048 positions, D 32:
    # Fixed forward+backward 0.047 s in bfloat16 against 0.026 s upcast), so the decomposition of a sparse
    # pattern computes in float32 there, as the native kernel does. Dense is one fused SDPA call: it stays.
    upcast = backend == "auto" and q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)
    if path == "masked":
        return masked_sdpa(q, k, v, pats, scale, upcast)
    if path == "flex":
        out = flex.run(q, k, v, pats, scale, fallback=backend == "auto")
        if out is not None:
            return out
        return attention(q, k, v, pats, backend="cuda", scale=scale)  # flex failed on auto: said once
    kernel = None if use_native else select_kernel(q.device, "auto" if backend == "native" else backend)

    def run(q, k, v, p: Pattern) -> torch.Tensor:
        if not use_native:
            if upcast and not isinstance(p, Dense):
                q, k, v = q.float(), k.float(), v.float()
            if L < N:  # the decomposition works on whole sequences: zero queries in front, cut off after
                q = F.pad(q, (0, 0, N - L, 0))
            o = SparseAttentionFunction.apply(q, k, v, make_plan(p, N), kernel, scale).to(dtype)
            return o[:, :, N - L :] if L < N else o
        pad = native.padded_dim(D) - D  # zero columns change no score; the output's are cut off
        q, k, v = (F.pad(t.float(), (0, pad)) if pad else t.float() for t in (q, k, v))
        o = tiles_attention(q, k, v, p, scale)
        return (o[..., :D] if pad else o).to(dtype)

    return by_head_groups(q, k, v, pats, run)
