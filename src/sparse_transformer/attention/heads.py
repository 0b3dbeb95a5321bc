"""Heads and their patterns: one pattern per head, and running heads that share a pattern together
(the paper's "multi-head" combination, section 5.1). Shared by ``attention`` and the model's caches."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..patterns import Pattern


def per_head_patterns(pattern: Pattern | Sequence[Pattern], n_head: int) -> list[Pattern]:
    """One pattern for each head: ``pattern.per_head(n_head)`` (the pattern repeated, or Fixed with
    distinct heads as one Fixed per head with its own summary offsets), or the given list checked."""
    if isinstance(pattern, Pattern):
        return pattern.per_head(n_head)
    if isinstance(pattern, (str, bytes)) or not isinstance(pattern, Sequence):
        raise ValueError(f"pattern must be a Pattern or a sequence of H Patterns, got {type(pattern).__name__}")
    pats = list(pattern)
    if len(pats) != n_head:
        raise ValueError(f"a per-head pattern list needs one pattern per head: got {len(pats)} for H={n_head}")
    for p in pats:
        if not isinstance(p, Pattern):
            raise ValueError(f"every per-head pattern must be a Pattern, got {type(p).__name__}")
    return pats


def by_head_groups(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pats: list[Pattern], run) -> torch.Tensor:
    """``run(q, k, v, pattern)`` once per group of heads that share a pattern, reassembled in head
    order: one call when every head shares it, slices and one cat for contiguous runs of heads."""
    groups = _groups(pats)
    if len(groups) == 1:
        return run(q, k, v, pats[0])
    if all(h == list(range(h[0], h[-1] + 1)) for h in groups.values()):
        # Contiguous runs of heads (the model's "multihead" split): slices and one cat,
        # whose backward is cheap, instead of gathers and index_copy.
        runs = sorted(groups.values())
        return torch.cat([run(*(t[:, h[0] : h[-1] + 1] for t in (q, k, v)), pats[h[0]]) for h in runs], dim=1)
    out = torch.empty_like(q)
    outs = []
    for heads in groups.values():
        idx = torch.tensor(heads, device=q.device)
        outs.append((idx, run(q[:, idx], k[:, idx], v[:, idx], pats[heads[0]])))
    # index_copy keeps autograd: each head's output comes from exactly one group.
    for idx, o in outs:
        out = out.index_copy(1, idx, o)
    return out


def head_groups(pattern: Pattern | Sequence[Pattern], n_head: int) -> list[tuple[torch.Tensor, Pattern]]:
    """(head indices, pattern) for the heads that share one pattern."""
    return [(torch.tensor(hs), p) for p, hs in _groups(per_head_patterns(pattern, n_head)).items()]


def _groups(pats: list[Pattern]) -> dict[Pattern, list[int]]:
    """The heads of each distinct pattern, in order of first appearance."""
    groups: dict[Pattern, list[int]] = {}
    for h, p in enumerate(pats):
        groups.setdefault(p, []).append(h)
    return groups
