"""Split a pattern into disjoint dense sub-problems on rearranged views (section 5.5).

Everything here works on the padded canonical layout x [B, Np, H, X] (the
layout a model's projections produce), where Np is a multiple of the
pattern's block length and X is the head width (or 1 for a log-sum-exp). A
``SubProblem`` gathers its queries and keys as 4-D views [G0, G1, L, X] /
[G0, G1, S, X] for a fused kernel (copies only for the compact summary keys
of the fixed pattern) and scatters results back by adding into the same
views. The sub-problems of a group cover disjoint query rows; the groups of a
pattern cover disjoint (query, key) pairs whose union is exactly the pattern,
so merging the groups through their log-sum-exps is exact.

  Local(w)        = diagonal blocks (causal) + previous block (upper triangle,
                    with a mask)
  Strided(l)      = Local(l) + strided columns: view [Np/l, l], transpose, and
                    attend causally inside each of the l segments, diagonal excluded
  Fixed(l, c)     = diagonal blocks + summary keys of earlier blocks, gathered
                    into one compact key set and attended in chunks of blocks
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..patterns import (
    Dense,
    Fixed,
    FixedBlock,
    FixedSummary,
    Local,
    Pattern,
    Strided,
    StridedColumns,
)


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    B, N, H, X = x.shape
    return x.view(B, N // b, b, H, X)  # (B, blocks, b, H, X)


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    """(G, L, H, X) -> (G, H, L, X), a view."""
    return t.permute(0, 2, 1, 3)


def _mask(keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Additive float mask (0 where keep, -inf elsewhere) in like's dtype."""
    return torch.zeros(keep.shape, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


@dataclass
class SubProblem:
    """One fused-kernel call on views of the canonical layout x [B, Np, H, X].

    ``q_in``/``kv_in`` return [G0, G1, L, X] / [G0, G1, S, X]; ``q_out``/``kv_out``
    add a result in that layout back into a canonical buffer. ``invalid_rows``
    marks query rows that the kernel computes but that must not count: they
    get output 0 and lse -inf in the forward, and lse +inf (zero weights) in
    the backward.
    """

    causal: bool = False

    def mask(self, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def invalid_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """For canonical x: a bool [G0, G1, L] of query rows to discard, or None."""
        return None

    def q_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def q_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        _add_into(self.q_in(buf), y, buf)

    def kv_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        _add_into(self.kv_in(buf), y, buf)


def _add_into(view: torch.Tensor, y: torch.Tensor, buf: torch.Tensor) -> None:
    # The gather must be a view of buf, or the addition would be lost.
    assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
    view += y.reshape(view.shape)


@dataclass
class Whole(SubProblem):
    """Dense causal attention on the sequence as it is."""

    causal: bool = True

    def q_in(self, x):
        return _heads_first(x)  # (B, H, Np, X)

    kv_in = q_in


@dataclass
class BlockDiagonal(SubProblem):
    """Causal attention inside each block of length b: j // b == i // b, j <= i."""

    b: int = 1
    causal: bool = True

    def q_in(self, x):
        B, N, H, X = x.shape
        return _heads_first(x.view(B * (N // self.b), self.b, H, X))  # (B*blocks, H, b, X)

    kv_in = q_in


@dataclass
class PreviousBlock(SubProblem):
    """Query offset a in block n attends keys of block n-1 with offset > a.

    The last query offset has no such key and key offset 0 serves no query, so
    queries are offsets 0..b-2 and keys offsets 1..b-1, with the mask
    column >= row. The blocks of all batch elements are taken as one flat
    list; the first block of each element would pair with the last block of
    the element before it, so those query rows are marked invalid.
    """

    b: int = 2

    def mask(self, like):
        n = self.b - 1
        return _mask(torch.ones(n, n, dtype=torch.bool, device=like.device).triu(), like)

    def _flat(self, x):
        B, N, H, X = x.shape
        return x.view(B * (N // self.b), self.b, H, X)

    def q_in(self, x):
        return _heads_first(self._flat(x)[1:, : self.b - 1])  # (B*blocks-1, H, b-1, X)

    def kv_in(self, x):
        return _heads_first(self._flat(x)[:-1, 1:])

    def invalid_rows(self, x):
        B, N, H, X = x.shape
        if B == 1:
            return None
        nb = N // self.b
        bad = (torch.arange(1, B * nb, device=x.device) % nb) == 0  # query block g is flat block g + 1
        return bad[:, None, None].expand(B * nb - 1, H, self.b - 1)


@dataclass
class Columns(SubProblem):
    """(i - j) % l == 0: view [Np/l, l], transpose, attend causally in each segment.

    ``strict`` leaves out j == i (the diagonal belongs to the local part then):
    queries are segment positions 1.., keys 0.., still a causal problem.
    """

    l: int = 1
    strict: bool = True
    causal: bool = True

    def _t(self, x):
        B, N, H, X = x.shape
        t = x.view(B, N // self.l, self.l, H, X).permute(0, 2, 3, 1, 4)  # (B, l, H, Np/l, X)
        return t.reshape(B, self.l * H, N // self.l, X)  # a view: l and H merge

    def q_in(self, x):
        return self._t(x)[:, :, 1:] if self.strict else self._t(x)

    def kv_in(self, x):
        return self._t(x)[:, :, :-1] if self.strict else self._t(x)


def _summary_keys(x, l, c, s0, upto):
    """The summary columns of blocks [0, upto): (B, upto*c, H, X), a copy."""
    B, N, H, X = x.shape
    return _blocks(x, l)[:, :upto, s0 : s0 + c].reshape(B, upto * c, H, X)


@dataclass
class SummaryPrefix(SubProblem):
    """Query blocks [b0, b1) attend the summary keys of all blocks before b0 (no mask)."""

    l: int = 1
    c: int = 1
    s0: int = 0
    b0: int = 1
    b1: int = 2

    def q_in(self, x):
        return _heads_first(x[:, self.b0 * self.l : self.b1 * self.l])  # (B, H, L, X)

    def kv_in(self, x):
        return _heads_first(_summary_keys(x, self.l, self.c, self.s0, self.b0))

    def kv_out(self, y, buf):
        B, N, H, X = buf.shape
        view = _blocks(buf, self.l)[:, : self.b0, self.s0 : self.s0 + self.c]  # (B, b0, c, H, X)
        view += y.view(B, H, self.b0, self.c, X).permute(0, 2, 3, 1, 4)


@dataclass
class SummaryInChunk(SubProblem):
    """Inside chunks of g blocks starting at block ``start`` (``count`` chunks):
    block n attends the summary keys of the earlier blocks of its chunk.

    The first block of a chunk has none and the last block's keys serve no
    one, so queries are blocks 1..g-1 and keys blocks 0..g-2, with the
    block-level lower-triangular mask (key block <= query block - 1).
    """

    l: int = 1
    c: int = 1
    s0: int = 0
    g: int = 2
    start: int = 0
    count: int = 1

    def mask(self, like):
        qb = torch.arange((self.g - 1) * self.l, device=like.device) // self.l
        kb = torch.arange((self.g - 1) * self.c, device=like.device) // self.c
        return _mask(kb[None, :] <= qb[:, None], like)

    def _chunks(self, x):
        B, N, H, X = x.shape
        blk = _blocks(x, self.l)[:, self.start : self.start + self.count * self.g]
        return blk.reshape(B, self.count, self.g, self.l, H, X)  # a view

    def q_in(self, x):
        B, N, H, X = x.shape
        q = self._chunks(x)[:, :, 1:].reshape(B * self.count, (self.g - 1) * self.l, H, X)  # a copy for B > 1
        return _heads_first(q)

    def q_out(self, y, buf):
        B, N, H, X = buf.shape
        view = self._chunks(buf)[:, :, 1:]  # (B, count, g-1, l, H, X)
        view += y.view(B, self.count, H, self.g - 1, self.l, X).permute(0, 1, 3, 4, 2, 5)

    def kv_in(self, x):
        B, N, H, X = x.shape
        k = self._chunks(x)[:, :, :-1, self.s0 : self.s0 + self.c].reshape(B * self.count, (self.g - 1) * self.c, H, X)
        return _heads_first(k)

    def kv_out(self, y, buf):
        B, N, H, X = buf.shape
        view = self._chunks(buf)[:, :, :-1, self.s0 : self.s0 + self.c]  # (B, count, g-1, c, H, X)
        view += y.view(B, self.count, H, self.g - 1, self.c, X).permute(0, 1, 3, 4, 2, 5)


@dataclass
class SummaryOwnBlock(SubProblem):
    """The summary columns of the query's own block that are not after it.

    Queries are offsets s0..l-1, keys offsets s0..s0+c-1: causal, top-left aligned.
    """

    l: int = 1
    c: int = 1
    s0: int = 0
    causal: bool = True

    def _flat(self, x):
        B, N, H, X = x.shape
        return x.view(B * (N // self.l), self.l, H, X)

    def q_in(self, x):
        return _heads_first(self._flat(x)[:, self.s0 :])

    def kv_in(self, x):
        return _heads_first(self._flat(x)[:, self.s0 : self.s0 + self.c])


@dataclass
class Plan:
    """The groups of sub-problems for one pattern at one padded length."""

    block: int  # the padded length is a multiple of this
    groups: list[list[SubProblem]] = field(default_factory=list)


def padded_length(n: int, block: int) -> int:
    return -(-n // block) * block


def _local(b: int, nb: int) -> list[list[SubProblem]]:
    groups: list[list[SubProblem]] = [[BlockDiagonal(b=b)]]
    if nb > 1 and b > 1:
        groups.append([PreviousBlock(b=b)])
    return groups


def _summary(l: int, c: int, s0: int, nb: int) -> list[list[SubProblem]]:
    """Blocks n >= 1 attend the summary keys of blocks < n, in chunks of g blocks."""
    if nb < 2:
        return []
    g = max(2, round(math.sqrt(nb)))
    prefix: list[SubProblem] = [
        SummaryPrefix(l=l, c=c, s0=s0, b0=b0, b1=min(b0 + g, nb)) for b0 in range(g, nb, g)
    ]
    inner: list[SubProblem] = []
    full = nb // g
    if full:
        inner.append(SummaryInChunk(l=l, c=c, s0=s0, g=g, start=0, count=full))
    rest = nb - full * g
    if rest >= 2:
        inner.append(SummaryInChunk(l=l, c=c, s0=s0, g=rest, start=full * g, count=1))
    return [grp for grp in (prefix, inner) if grp]


def make_plan(pattern: Pattern, head: int, n: int) -> Plan:
    """Decompose ``pattern`` (as head ``head`` sees it) for sequences of length n."""
    if isinstance(pattern, Dense):
        return Plan(block=1, groups=[[Whole()]])
    if isinstance(pattern, Local):
        b = pattern.window
        return Plan(block=b, groups=_local(b, padded_length(n, b) // b))
    if isinstance(pattern, Strided):
        l = pattern.stride
        m = padded_length(n, l) // l
        groups = _local(l, m)
        if m > 1:
            groups.append([Columns(l=l, strict=True)])
        return Plan(block=l, groups=groups)
    if isinstance(pattern, StridedColumns):
        return Plan(block=pattern.stride, groups=[[Columns(l=pattern.stride, strict=False)]])
    if isinstance(pattern, FixedBlock):
        return Plan(block=pattern.stride, groups=[[BlockDiagonal(b=pattern.stride)]])
    if isinstance(pattern, Fixed):
        l = pattern.stride
        nb = padded_length(n, l) // l
        return Plan(block=l, groups=[[BlockDiagonal(b=l)]] + _summary(l, pattern.c, pattern.summary_start(head), nb))
    if isinstance(pattern, FixedSummary):
        l, c, s0 = pattern.stride, pattern.c, pattern.summary_start(head)
        nb = padded_length(n, l) // l
        return Plan(block=l, groups=[[SummaryOwnBlock(l=l, c=c, s0=s0)]] + _summary(l, c, s0, nb))
    raise ValueError(
        f"no fast decomposition for pattern {pattern!r}; use backend='reference' "
        "or one of Dense, Local, Strided, StridedColumns, Fixed, FixedBlock, FixedSummary"
    )


def plan_key(pattern: Pattern, head: int) -> tuple:
    """Heads whose patterns give equal keys can share one batched computation."""
    s0 = pattern.summary_start(head) if isinstance(pattern, (Fixed, FixedSummary)) else None
    return (pattern, s0)
