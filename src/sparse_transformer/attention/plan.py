"""Split a pattern into disjoint dense sub-problems on rearranged views (section 5.5).

Everything here works on the padded canonical layout x [B*H, Np, X], where Np
is a multiple of the pattern's block length and X is the head width (or 1 for
a log-sum-exp). A ``SubProblem`` says how to gather its queries and keys into
a [B*H, G, L, X] / [B*H, G, S, X] batch for a fused kernel, and how to scatter
results back. The sub-problems of a ``Group`` cover disjoint query rows; the
groups of a pattern cover disjoint (query, key) pairs whose union is exactly
the pattern, so merging the groups through their log-sum-exps is exact.

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

from ..patterns import Pattern


def _blocks(x: torch.Tensor, b: int) -> torch.Tensor:
    BH, N, X = x.shape
    return x.view(BH, N // b, b, X)  # (BH, blocks, b, X)


def _upper_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """Additive [n, n] mask that keeps column >= row."""
    keep = torch.ones(n, n, dtype=torch.bool, device=like.device).triu()
    return torch.zeros(n, n, dtype=like.dtype, device=like.device).masked_fill_(~keep, float("-inf"))


@dataclass
class SubProblem:
    """One fused-kernel call on views of the canonical layout x [B*H, Np, X].

    ``q_in``/``kv_in`` return [B*H, G, L, X] / [B*H, G, S, X] (views where the
    layout allows, so nothing is copied); ``q_out``/``kv_out`` add a result in
    that layout back into a canonical buffer.
    """

    causal: bool = False

    def mask(self, like: torch.Tensor) -> torch.Tensor | None:
        return None

    def q_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kv_in(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def q_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        _add_into(self.q_in(buf), y, buf)

    def kv_out(self, y: torch.Tensor, buf: torch.Tensor) -> None:
        _add_into(self.kv_in(buf), y, buf)

    def q_out_scaled(self, y: torch.Tensor, w: torch.Tensor, buf: torch.Tensor) -> None:
        """buf[rows] += y * w[..., None], with y [B*H, G, L, X] and w [B*H, G, L]."""
        view = self.q_in(buf)
        _check_view(view, buf)
        view.addcmul_(y.reshape(view.shape), w.reshape(view.shape[:-1])[..., None])


def _check_view(view: torch.Tensor, buf: torch.Tensor) -> None:
    # The gather must be a view of buf, or the addition would be lost.
    assert view.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()


def _add_into(view: torch.Tensor, y: torch.Tensor, buf: torch.Tensor) -> None:
    _check_view(view, buf)
    view += y.reshape(view.shape)


@dataclass
class Whole(SubProblem):
    """Dense causal attention on the sequence as it is."""

    causal: bool = True

    def q_in(self, x):
        return x[:, None]

    kv_in = q_in


@dataclass
class BlockDiagonal(SubProblem):
    """Causal attention inside each block of length b: j // b == i // b, j <= i."""

    b: int = 1
    causal: bool = True

    def q_in(self, x):
        return _blocks(x, self.b)

    kv_in = q_in


@dataclass
class PreviousBlock(SubProblem):
    """Query offset a in block n attends keys of block n-1 with offset > a.

    The last query offset has no such key and key offset 0 serves no query, so
    queries are offsets 0..b-2 and keys offsets 1..b-1, with the mask
    column >= row.
    """

    b: int = 2

    def mask(self, like):
        return _upper_mask(self.b - 1, like)

    def q_in(self, x):
        return _blocks(x, self.b)[:, 1:, : self.b - 1]

    def kv_in(self, x):
        return _blocks(x, self.b)[:, :-1, 1:]


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
        BH, N, X = x.shape
        return x.view(BH, N // self.l, self.l, X).transpose(1, 2)  # (BH, l, Np/l, X)

    def q_in(self, x):
        return self._t(x)[:, :, 1:] if self.strict else self._t(x)

    def kv_in(self, x):
        return self._t(x)[:, :, :-1] if self.strict else self._t(x)


@dataclass
class SummaryPrefix(SubProblem):
    """Query blocks [b0, b1) attend the summary keys of all blocks before b0 (no mask)."""

    l: int = 1
    c: int = 1
    s0: int = 0
    b0: int = 1
    b1: int = 2

    def q_in(self, x):
        return x[:, None, self.b0 * self.l : self.b1 * self.l]

    def kv_in(self, x):
        return _blocks(x, self.l)[:, : self.b0, self.s0 : self.s0 + self.c].reshape(x.shape[0], 1, -1, x.shape[-1])

    def kv_out(self, y, buf):
        _blocks(buf, self.l)[:, : self.b0, self.s0 : self.s0 + self.c] += y.reshape(buf.shape[0], self.b0, self.c, -1)


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
        BH, N, X = x.shape
        blk = _blocks(x, self.l)[:, self.start : self.start + self.count * self.g]
        return blk.reshape(BH, self.count, self.g, self.l, X)  # a view

    def q_in(self, x):
        BH, N, X = x.shape
        return self._chunks(x)[:, :, 1:].reshape(BH, self.count, (self.g - 1) * self.l, X)

    def _kv(self, x):
        return self._chunks(x)[:, :, :-1, self.s0 : self.s0 + self.c]  # (BH, count, g-1, c, X)

    def kv_in(self, x):
        BH, N, X = x.shape
        return self._kv(x).reshape(BH, self.count, -1, X)

    def kv_out(self, y, buf):
        t = self._kv(buf)
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
        return _blocks(x, self.l)[:, :, self.s0 :]

    def kv_in(self, x):
        return _blocks(x, self.l)[:, :, self.s0 : self.s0 + self.c]


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


def _columns(n: int, l: int, strict: bool) -> list[list[SubProblem]]:
    return [[Columns(l=l, strict=strict)]] if padded_length(n, l) // l > 1 or not strict else []


# Each part of a pattern's decomposition (Pattern.decomposition) -> its groups of sub-problems.
_PARTS = {
    "whole": lambda n: [[Whole()]],
    "band": lambda n, w: _local(w, padded_length(n, w) // w),
    "columns": _columns,
    "blocks": lambda n, l: [[BlockDiagonal(b=l)]],
    "own_summary": lambda n, l, c, s0: [[SummaryOwnBlock(l=l, c=c, s0=s0)]],
    "summaries": lambda n, l, c, s0: _summary(l, c, s0, padded_length(n, l) // l),
}


def make_plan(pattern: Pattern, n: int) -> Plan:
    """Decompose ``pattern`` for sequences of length n, from ``pattern.decomposition()``."""
    parts = pattern.decomposition()
    if not parts:
        raise ValueError(f"no fast decomposition for pattern {pattern!r}; use backend='reference' or the native kernel")
    sizes = {p[1] for p in parts if len(p) > 1}
    if len(sizes) > 1:
        raise ValueError(f"{pattern!r}: the parts of a decomposition share one block length, got {sorted(sizes)}")
    groups = [g for name, *args in parts for g in _PARTS[name](n, *args)]
    return Plan(block=sizes.pop() if sizes else 1, groups=groups)
