"""Split a pattern into disjoint dense sub-problems on rearranged views (section 5.5).

Everything here works on the padded canonical layout x [B, H, Np, X], where Np
is a multiple of the pattern's block length and X is the head width (or 1 for
a log-sum-exp). A ``SubProblem`` says how to gather its queries and keys into
a [B, G, L, X] / [B, G, S, X] batch for a fused kernel, and how to scatter
results back. The sub-problems of a ``Group`` cover disjoint query rows; the
groups of a pattern cover disjoint (query, key) pairs whose union is exactly
the pattern, so merging the groups through their log-sum-exps is exact.

  Local(w)        = diagonal blocks (causal) + previous block (upper triangle,
                    done as a causal problem after reversing both blocks)
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
    B, H, N, X = x.shape
    return x.view(B, H, N // b, b, X)


@dataclass
class SubProblem:
    """One fused-kernel call. Subclasses define the gathers and scatters."""

    causal: bool = False

    def mask(self, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def q_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def q_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        """Add y (in q_in's layout) into buf (canonical layout)."""
        raise NotImplementedError

    def kv_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        raise NotImplementedError


@dataclass
class Whole(SubProblem):
    """Dense causal attention on the sequence as it is."""

    causal: bool = True

    def q_in(self, x):
        return x

    kv_in = q_in

    def q_out(self, y, buf):
        buf += y

    kv_out = q_out


@dataclass
class BlockDiagonal(SubProblem):
    """Causal attention inside each block of length b: j // b == i // b, j <= i."""

    b: int = 1
    causal: bool = True

    def q_in(self, x):
        B, H, N, X = x.shape
        return x.reshape(B, H * (N // self.b), self.b, X)

    kv_in = q_in

    def q_out(self, y, buf):
        buf += y.reshape(buf.shape)

    kv_out = q_out


@dataclass
class PreviousBlock(SubProblem):
    """Query offset a in block n attends keys of block n-1 with offset > a.

    Reversing both blocks turns this upper triangle into a causal problem:
    query rows are offsets b-2..0, key columns offsets b-1..1.
    """

    b: int = 2
    causal: bool = True

    def q_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.b)[:, :, 1:, : self.b - 1].flip(3).reshape(B, -1, self.b - 1, X)

    def kv_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.b)[:, :, :-1, 1:].flip(3).reshape(B, -1, self.b - 1, X)

    def q_out(self, y, buf):
        B, H, N, X = buf.shape
        _blocks(buf, self.b)[:, :, 1:, : self.b - 1] += y.reshape(B, H, -1, self.b - 1, X).flip(3)

    def kv_out(self, y, buf):
        B, H, N, X = buf.shape
        _blocks(buf, self.b)[:, :, :-1, 1:] += y.reshape(B, H, -1, self.b - 1, X).flip(3)


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
        B, H, N, X = x.shape
        return x.view(B, H, N // self.l, self.l, X).transpose(2, 3)  # (B, H, l, Np/l, X)

    def q_in(self, x):
        B, H, N, X = x.shape
        t = self._t(x)[..., 1:, :] if self.strict else self._t(x)
        return t.reshape(B, H * self.l, -1, X)

    def kv_in(self, x):
        B, H, N, X = x.shape
        t = self._t(x)[..., :-1, :] if self.strict else self._t(x)
        return t.reshape(B, H * self.l, -1, X)

    def q_out(self, y, buf):
        B, H, N, X = buf.shape
        t = self._t(buf)[..., 1:, :] if self.strict else self._t(buf)
        t += y.reshape(t.shape)

    def kv_out(self, y, buf):
        B, H, N, X = buf.shape
        t = self._t(buf)[..., :-1, :] if self.strict else self._t(buf)
        t += y.reshape(t.shape)


@dataclass
class SummaryPrefix(SubProblem):
    """Query blocks [b0, b1) attend the summary keys of all blocks before b0 (no mask)."""

    l: int = 1
    c: int = 1
    s0: int = 0
    b0: int = 1
    b1: int = 2

    def q_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.l)[:, :, self.b0 : self.b1].reshape(B, H, -1, X)

    def kv_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.l)[:, :, : self.b0, self.s0 : self.s0 + self.c].reshape(B, H, -1, X)

    def q_out(self, y, buf):
        B, H, N, X = buf.shape
        _blocks(buf, self.l)[:, :, self.b0 : self.b1] += y.reshape(B, H, self.b1 - self.b0, self.l, X)

    def kv_out(self, y, buf):
        B, H, N, X = buf.shape
        _blocks(buf, self.l)[:, :, : self.b0, self.s0 : self.s0 + self.c] += y.reshape(B, H, self.b0, self.c, X)


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
        m = torch.zeros(qb.numel(), kb.numel(), dtype=like.dtype, device=like.device)
        return m.masked_fill_(kb[None, :] > qb[:, None], float("-inf"))

    def _chunks(self, x):
        B, H, N, X = x.shape
        blk = _blocks(x, self.l)[:, :, self.start : self.start + self.count * self.g]
        return blk.view(B, H, self.count, self.g, self.l, X)  # (B, H, chunks, g, l, X)

    def q_in(self, x):
        B, H, N, X = x.shape
        return self._chunks(x)[:, :, :, 1:].reshape(B, H * self.count, -1, X)

    def kv_in(self, x):
        B, H, N, X = x.shape
        return self._chunks(x)[:, :, :, :-1, self.s0 : self.s0 + self.c].reshape(B, H * self.count, -1, X)

    def q_out(self, y, buf):
        t = self._chunks(buf)[:, :, :, 1:]
        t += y.reshape(t.shape)

    def kv_out(self, y, buf):
        t = self._chunks(buf)[:, :, :, :-1, self.s0 : self.s0 + self.c]
        t += y.reshape(t.shape)


@dataclass
class SummaryOwnBlock(SubProblem):
    """The summary columns of the query's own block that are not after it.

    Queries are offsets s0..l-1, keys offsets s0..s0+c-1: causal, top-left aligned.
    """

    l: int = 1
    c: int = 1
    s0: int = 0
    causal: bool = True

    def q_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.l)[:, :, :, self.s0 :].reshape(B, -1, self.l - self.s0, X)

    def kv_in(self, x):
        B, H, N, X = x.shape
        return _blocks(x, self.l)[:, :, :, self.s0 : self.s0 + self.c].reshape(B, -1, self.c, X)

    def q_out(self, y, buf):
        t = _blocks(buf, self.l)[:, :, :, self.s0 :]
        t += y.reshape(t.shape)

    def kv_out(self, y, buf):
        t = _blocks(buf, self.l)[:, :, :, self.s0 : self.s0 + self.c]
        t += y.reshape(t.shape)


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
