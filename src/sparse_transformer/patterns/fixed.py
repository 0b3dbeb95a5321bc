"""Fixed attention (paper section 4.3, figure 3c).

A^(1) = the block of length ``stride`` that holds i; A^(2) = the "summary"
columns, the last ``c`` positions of every block, or with ``summary`` = k the
offsets [stride - c(k+1), stride - ck). With ``distinct_heads``, ``per_head``
gives head h its own summary k = h mod (stride // c), as in the authors'
released code; the paper reports this works better. Per-head patterns are just
a list: ``Fixed(128, 16, distinct_heads=True).per_head(4)`` is
``[Fixed(128, 16, summary=k) for k in range(4)]``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .base import Pattern, check_int
from .registry import register
from .tiles import BAND, FULL, MASK, Tiles, from_intervals


def _per_head(pattern, n_head: int) -> list:
    if not pattern.distinct_heads:
        return [pattern] * n_head
    groups = pattern.stride // pattern.c
    return [replace(pattern, distinct_heads=False, summary=h % groups) for h in range(n_head)]


def _summary_keys(stride: int, c: int, start: int, end: int) -> torch.Tensor:
    """The summary positions (offsets [start, start + c) of every block) below ``end``."""
    blocks = torch.arange(0, end, stride)
    keys = (blocks[:, None] + torch.arange(start, start + c)[None, :]).reshape(-1)
    return keys[keys < end]


def _fixed_tiles(pattern: Pattern, n: int, tile: int, summaries: bool, own_start: int | None) -> Tiles:
    """The fixed family in O(n / tile) (tiles.py): the summary columns of the blocks before a tile's
    first block as one FULL interval of a gathered view (``summaries``), then the tile's own block
    from ``own_start`` (an offset; None = from 0, the whole block causally). A tile that straddles
    two blocks (when ``tile`` does not divide ``stride``) gets an exact byte mask over its blocks."""
    l = pattern.stride
    c = getattr(pattern, "c", 0)
    s0 = pattern.summary_start() if summaries else 0
    r0 = torch.arange(0, n, tile)
    r1 = torch.clamp(r0 + tile, max=n)
    b0, b1 = r0 // l, (r1 - 1) // l
    t = torch.arange(len(r0))
    z = torch.zeros_like(r0)
    own0 = b0 * l + (own_start if own_start is not None else 0)
    own1 = torch.clamp(b0 * l + (own_start + c if own_start is not None else l), max=r1)
    own1 = torch.where(b0 == b1, own1, r1)
    own0 = torch.where(b0 == b1, own0, b0 * l)
    kind, arg, pool, offset = z + BAND, z.clone(), [], 0
    for x in torch.nonzero(b0 != b1).flatten().tolist():  # straddling tiles only
        i = torch.arange(int(r0[x]), int(r1[x]))[:, None]
        j = torch.arange(int(own0[x]), int(own1[x]))[None, :]
        m = pattern.allowed(i, j) & (j // l >= int(b0[x]))
        kind[x], arg[x] = MASK, offset
        pool.append(m.reshape(-1).to(torch.uint8))
        offset += m.numel()
    masks = torch.cat(pool) if pool else None
    if not summaries:
        return from_intervals(n, tile, t, z, own0, own1, kind, arg, masks=masks)
    gather = (torch.arange(max(0, (n - 1) // l))[:, None] * l + s0 + torch.arange(c)[None, :]).reshape(-1)
    tiles = torch.stack([t, t], 1).reshape(-1)
    view = torch.stack([z + 1, z], 1).reshape(-1)
    start = torch.stack([z, own0], 1).reshape(-1)
    end = torch.stack([b0 * c, own1], 1).reshape(-1)
    kinds = torch.stack([z + FULL, kind], 1).reshape(-1)
    args = torch.stack([z, arg], 1).reshape(-1)
    return from_intervals(n, tile, tiles, view, start, end, kinds, args, gather=gather, masks=masks)


@dataclass(frozen=True)
class _WithSummaries(Pattern):
    """The parameters and summary offsets that Fixed and FixedSummary share."""

    stride: int
    c: int
    distinct_heads: bool = False
    summary: int = 0

    def __post_init__(self):
        _check(self.stride, self.c, self.summary)

    def summary_start(self) -> int:
        """The first offset of the summary columns: stride - c (summary + 1)."""
        return self.stride - self.c * (self.summary + 1)

    def per_head(self, n_head):
        return _per_head(self, n_head)


def _check(stride: int, c: int, summary: int) -> None:
    check_int("stride", stride, 1)
    check_int("c", c, 1, stride)
    check_int("summary", summary, 0, stride // c - 1)


@register("fixed_block", "stride")
@dataclass(frozen=True)
class FixedBlock(Pattern):
    """j <= i and j // stride == i // stride: the first factor of the fixed pattern."""

    stride: int

    def __post_init__(self):
        check_int("stride", self.stride, 1)

    def allowed(self, i, j):
        return (j <= i) & (j // self.stride == i // self.stride)

    def row_counts(self, n):
        return torch.arange(n) % self.stride + 1

    def row_keys(self, i):
        return torch.arange(i - i % self.stride, i + 1)

    def decomposition(self):
        return [("blocks", self.stride)]

    def tiles(self, n, tile):
        return _fixed_tiles(self, n, tile, summaries=False, own_start=None)


@register("fixed_summary", "stride", "c", "distinct_heads", "summary")
@dataclass(frozen=True)
class FixedSummary(_WithSummaries):
    """j <= i and j % stride in the summary offsets: the second factor of the fixed pattern.

    Queries before the first summary column have no key; their output is zero.
    """

    def allowed(self, i, j):
        s = self.summary_start()
        off = j % self.stride
        return (j <= i) & (off >= s) & (off < s + self.c)

    def row_counts(self, n):
        i = torch.arange(n)
        s = self.summary_start()
        own = torch.clamp(i % self.stride - s + 1, min=0, max=self.c)
        return (i // self.stride) * self.c + own

    def row_keys(self, i):
        return _summary_keys(self.stride, self.c, self.summary_start(), i + 1)

    def decomposition(self):
        return [("own_summary", self.stride, self.c, self.summary_start()),
                ("summaries", self.stride, self.c, self.summary_start())]

    def tiles(self, n, tile):
        return _fixed_tiles(self, n, tile, summaries=True, own_start=self.summary_start())


@register("fixed", "stride", "c", "distinct_heads", "summary")
@dataclass(frozen=True)
class Fixed(_WithSummaries):
    """j <= i and (j // stride == i // stride or j % stride in the summary offsets).

    With ``summary`` 0 the summary offsets are the last ``c`` of each block,
    i.e. j % stride >= stride - c.
    """

    def allowed(self, i, j):
        s = self.summary_start()
        off = j % self.stride
        same_block = j // self.stride == i // self.stride
        return (j <= i) & (same_block | ((off >= s) & (off < s + self.c)))

    def row_counts(self, n):
        i = torch.arange(n)
        return i % self.stride + 1 + (i // self.stride) * self.c

    def row_keys(self, i):
        block = i - i % self.stride
        summaries = _summary_keys(self.stride, self.c, self.summary_start(), block)
        return torch.cat([summaries, torch.arange(block, i + 1)])

    def factors(self):
        return (FixedBlock(self.stride), FixedSummary(self.stride, self.c, self.distinct_heads, self.summary))

    def decomposition(self):
        return [("blocks", self.stride), ("summaries", self.stride, self.c, self.summary_start())]

    def tiles(self, n, tile):
        return _fixed_tiles(self, n, tile, summaries=True, own_start=None)
