"""``attention(q, k, v, pattern)``: exact factorized sparse attention (sections 4.3, 5.5)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..patterns import Pattern
from .function import SparseAttentionFunction
from .kernels import default_scale, select_kernel
from .parts import make_plan, plan_key
from .reference import reference_attention

BACKENDS = ("auto", "reference", "cpu", "cuda", "math")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_inputs(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v must have the same shape [B, H, N, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise ValueError(f"dtype must be one of float32, float64, bfloat16, float16, got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on the same device, got {q.device}, {k.device}, {v.device}")
    if q.shape[2] < 1 or q.shape[3] < 1 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"every dimension of [B, H, N, D] must be >= 1, got {tuple(q.shape)}")


def per_head_patterns(pattern: Pattern | Sequence[Pattern], n_head: int) -> list[Pattern]:
    """One pattern for each head: ``pattern`` repeated, or the given list checked."""
    if isinstance(pattern, Pattern):
        return [pattern] * n_head
    if isinstance(pattern, (str, bytes)) or not isinstance(pattern, Sequence):
        raise ValueError(f"pattern must be a Pattern or a sequence of H Patterns, got {type(pattern).__name__}")
    pats = list(pattern)
    if len(pats) != n_head:
        raise ValueError(f"a per-head pattern list needs one pattern per head: got {len(pats)} for H={n_head}")
    for p in pats:
        if not isinstance(p, Pattern):
            raise ValueError(f"every per-head pattern must be a Pattern, got {type(p).__name__}")
    return pats


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

    ``pattern`` is one Pattern for all heads, or a sequence of H patterns (head h
    uses ``pattern[h]``; this is the paper's "multi-head" combination, section 5.1).
    A Fixed pattern with ``distinct_heads`` gives head h its own summary offsets.

    backend:
      "auto"      the fast path: the fused kernel of the device ("cpu" or "cuda"),
                  "math" with a warning on other devices
      "reference" dense masked softmax, O(N^2): the test oracle
      "cpu", "cuda", "math"  the fast path with that kernel

    The fast path never forms an N x N matrix: for strided and fixed patterns
    with stride ~ sqrt(N) it costs O(N sqrt(N)) time and memory.
    Queries with no allowed key (only possible for some factor patterns) give zeros.
    """
    _check_inputs(q, k, v)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    H, N, D = q.shape[1], q.shape[2], q.shape[3]
    pats = per_head_patterns(pattern, H)
    if scale is None:
        scale = default_scale(D)
    if backend == "reference":
        return reference_attention(q, k, v, pats, scale)
    kernel = select_kernel(q.device, backend)

    groups: dict[tuple, list[int]] = {}
    for h, p in enumerate(pats):
        groups.setdefault(plan_key(p, h), []).append(h)
    if len(groups) == 1:
        return SparseAttentionFunction.apply(q, k, v, make_plan(pats[0], 0, N), kernel, scale)

    out = torch.empty_like(q)
    outs = []
    for heads in groups.values():
        idx = torch.tensor(heads, device=q.device)
        plan = make_plan(pats[heads[0]], heads[0], N)
        o = SparseAttentionFunction.apply(q[:, idx], k[:, idx], v[:, idx], plan, kernel, scale)
        outs.append((idx, o))
    # index_copy keeps autograd: each head's output comes from exactly one group.
    for idx, o in outs:
        out = out.index_copy(1, idx, o)
    return out
