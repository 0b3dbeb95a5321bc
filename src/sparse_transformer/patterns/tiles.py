"""A pattern's description: the key intervals of each tile of queries (paper section 5.5).

The fused CPU kernel (``attention/native/kernel.c``) and the pictures read a pattern through this
description only. The queries are cut into tiles of ``tile`` consecutive positions; tile t
reads a few intervals of keys, each contiguous either

- in the sequence itself (view 0), or
- in one gathered key view (view 1): the positions ``gather`` (the summary columns of the
  fixed pattern, the global tokens of BigBird), copied once per sequence,

and each says which of its keys a query may attend:

- ``FULL``: all of them, for every query of the tile;
- ``BAND`` w: key position <= query position and, if w > 0, query - key < w;
- ``MASK``: a [rows, len] byte mask in the ``masks`` pool (the cut tiles of a predicate).

The intervals of a tile are disjoint, so the kernel takes one softmax over all of them.
Optionally a second layout, ``columns = (stride, strict, window)``: the sequence viewed as
[N/l, l] and transposed, where the strided columns are a local window (section 5.5): query
i attends i - l, i - 2l, ... (and i itself unless ``strict``), the nearest ``window`` of
them (0: all). Its result is merged with the tiles' through the log-sum-exps.

The closed forms of the paper's patterns cost O(N / tile) to build; ``from_allowed`` builds
the description of any ``allowed`` predicate by evaluating it once per tile (O(N^2) work,
O(N / tile) intervals plus the cut tiles' masks).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .predicate import block_status, cut_masks

FULL, BAND, MASK = 0, 1, 2


@dataclass(frozen=True, eq=False)
class Tiles:
    """The key intervals of every tile of ``tile`` queries, for a sequence of length ``n``."""

    n: int
    tile: int
    ptr: torch.Tensor  # int32 [ntiles + 1]: tile t has intervals iv[ptr[t]:ptr[t+1]]
    iv: torch.Tensor  # int32 [n_iv, 5]: view, start, end, kind, arg (BAND: window, 0 = none; MASK: pool offset)
    gather: torch.Tensor  # int32 [ng]: the positions of view 1
    masks: torch.Tensor  # uint8 pool of the MASK intervals
    columns: tuple[int, bool, int] | None = None  # (stride, strict, window): the transposed layout, merged after

    @property
    def ntiles(self) -> int:
        return self.ptr.numel() - 1

    @functools.cached_property
    def tile_of(self) -> torch.Tensor:
        """int64 [n_iv]: the tile each interval belongs to."""
        return torch.repeat_interleave(torch.arange(self.ntiles), (self.ptr[1:] - self.ptr[:-1]).long())

    @functools.cached_property
    def max_keys(self) -> int:
        """The most keys one tile reads (the kernel's scratch size)."""
        if self.iv.numel() == 0:
            return 0
        lens = (self.iv[:, 2] - self.iv[:, 1]).long()
        return int(torch.zeros(self.ntiles, dtype=torch.long).index_add_(0, self.tile_of, lens).max())

    def row_counts(self) -> torch.Tensor:
        """int64 [n]: how many keys each query attends, read from the intervals (columns included).

        O(intervals x tile) plus the MASK intervals' bytes: no predicate is evaluated."""
        n, T = self.n, self.tile
        counts = torch.zeros(n, dtype=torch.long)
        iv = self.iv.long()
        if iv.numel():
            tile_of = self.tile_of
            view, s, e, kind, arg = iv.unbind(1)
            q = tile_of[:, None] * T + torch.arange(T)[None, :]  # (intervals, T) query positions
            real = q < n
            full = (e - s)[:, None].expand_as(q)
            lo = torch.where(arg[:, None] > 0, q - arg[:, None] + 1, s[:, None])  # BAND w: q - w < k <= q
            band = (torch.minimum(e[:, None] - 1, q) - torch.maximum(s[:, None], lo) + 1).clamp(min=0)
            simple = (kind == FULL) | ((kind == BAND) & (view == 0))
            per = torch.where((kind == FULL)[:, None], full, band)
            rows = (simple[:, None] & real).nonzero()
            counts.index_add_(0, q[rows[:, 0], rows[:, 1]], per[rows[:, 0], rows[:, 1]])
            for x in (~simple).nonzero().flatten().tolist():  # gathered bands and byte masks: row by row
                t, (vw, a, b, kd, w) = int(tile_of[x]), iv[x].tolist()
                qs = torch.arange(t * T, min(n, (t + 1) * T))
                if kd == MASK:
                    ok = self.masks[w : w + len(qs) * (b - a)].view(len(qs), b - a).bool()
                else:
                    k = self.gather[a:b].long() if vw else torch.arange(a, b)
                    d = qs[:, None] - k[None, :]
                    ok = (d >= 0) & ((d < w) if w > 0 else True)
                counts[qs] += ok.sum(1)
        if self.columns:  # query i attends i - m l for m = (1 if strict else 0) .. min(i // l, window - 1)
            l, strict, window = self.columns
            i = torch.arange(n)
            top = i // l if not window else torch.clamp(i // l, max=window - 1)
            counts += (top - int(strict) + 1).clamp(min=0)
        return counts

    def coverage(self) -> torch.Tensor:
        """int32 [n, n]: how many times each (query, key) pair is computed, columns included.

        A correct description gives exactly the pattern's mask: 1 where allowed, 0 elsewhere.
        O(n^2): for tests and pictures."""
        n, T = self.n, self.tile
        out = torch.zeros(n, n, dtype=torch.int32)
        for t in range(self.ntiles):
            q = torch.arange(t * T, min(n, (t + 1) * T))
            for view, s, e, kind, arg in self.iv[self.ptr[t] : self.ptr[t + 1]].tolist():
                k = torch.arange(s, e) if view == 0 else self.gather[s:e].long()
                if kind == FULL:
                    ok = torch.ones(len(q), len(k), dtype=torch.bool)
                elif kind == BAND:
                    d = q[:, None] - k[None, :]
                    ok = (d >= 0) & ((d < arg) if arg > 0 else True)
                else:
                    ok = self.masks[arg : arg + len(q) * len(k)].view(len(q), len(k)).bool()
                out[q[:, None], k[None, :]] += ok.int()
        if self.columns:
            l, strict, window = self.columns
            i = torch.arange(n)
            d = i[:, None] - i[None, :]
            near = (d // l < window) if window else True
            out += ((d >= (l if strict else 0)) & (d % l == 0) & near).int()
        return out


def from_intervals(n: int, tile: int, tile_of: torch.Tensor, view: torch.Tensor, start: torch.Tensor,
                   end: torch.Tensor, kind: torch.Tensor, arg: torch.Tensor, gather: torch.Tensor | None = None,
                   masks: torch.Tensor | None = None, columns: tuple[int, bool, int] | None = None) -> Tiles:
    """A description from one entry per interval (tensors of equal length, sorted by ``tile_of``);
    empty intervals are dropped."""
    keep = end > start
    cols = [t[keep].to(torch.int32) for t in (view, start, end, kind, arg)]
    ntiles = -(-n // tile)
    counts = torch.bincount(tile_of[keep].long(), minlength=ntiles)
    ptr = torch.zeros(ntiles + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(counts, 0)
    return Tiles(n, tile, ptr, torch.stack(cols, 1).contiguous() if cols[0].numel() else torch.zeros(0, 5, dtype=torch.int32),
                 (gather if gather is not None else torch.zeros(0)).to(torch.int32).contiguous(),
                 masks if masks is not None else torch.zeros(0, dtype=torch.uint8), columns)


def band(n: int, tile: int, window: int, columns: tuple[int, bool, int] | None = None) -> Tiles:
    """i - window < j <= i (window 0: every j <= i): one interval per tile."""
    r0 = torch.arange(0, n, tile)
    r1 = torch.clamp(r0 + tile, max=n)
    start = torch.clamp(r0 - window + 1, min=0) if window else torch.zeros_like(r0)
    z = torch.zeros_like(r0)
    return from_intervals(n, tile, torch.arange(len(r0)), z, start, r1, z + BAND, z + window, columns=columns)


def columns_only(n: int, tile: int, stride: int, strict: bool, window: int = 0) -> Tiles:
    """No tile intervals: only the transposed layout (StridedColumns, DilatedWindow)."""
    none = torch.zeros(0, dtype=torch.long)
    return from_intervals(n, tile, none, none, none, none, none, none, columns=(stride, strict, window))


def _runs(status: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first, last + 1, status) of each run of equal nonzero values."""
    edges = torch.nonzero(status[1:] != status[:-1]).flatten() + 1
    bounds = [0, *edges.tolist(), len(status)]
    return [(a, b, int(status[a])) for a, b in zip(bounds[:-1], bounds[1:]) if status[a] != 0]


def tile_intervals(ok: torch.Tensor, r0: int, block: int, k0: int = 0):
    """Intervals of one tile of queries r0.. from its allowed matrix ``ok`` [rows, K] (keys k0..k0+K-1).

    Key blocks are classified empty, full or cut; runs of full blocks become one FULL interval,
    cut runs a BAND 0 interval when they are exactly causal, else a MASK. Yields
    (start, end, kind, mask or None)."""
    rows, K = ok.shape
    nb = -(-K // block)
    padded = torch.zeros(rows, nb * block, dtype=torch.bool)
    padded[:, :K] = ok
    blocks = padded.view(rows, nb, block)
    inside = torch.zeros(nb * block, dtype=torch.bool)
    inside[:K] = True
    any_, all_ = blocks.any(2).any(0), (blocks | ~inside.view(nb, block)).all(2).all(0)
    status = torch.where(all_ & any_, 1, torch.where(any_, 2, 0))
    q = torch.arange(r0, r0 + rows)[:, None]
    for a, b, s in _runs(status):
        s0, s1 = a * block, min(b * block, K)
        if s == 1:
            yield k0 + s0, k0 + s1, FULL, None
            continue
        sub = ok[:, s0:s1]
        if torch.equal(sub, torch.arange(k0 + s0, k0 + s1)[None, :] <= q):
            yield k0 + s0, k0 + s1, BAND, None
        else:
            yield k0 + s0, k0 + s1, MASK, sub


def from_allowed(allowed, n: int, tile: int, block: int | None = None, compile: bool | None = None) -> Tiles:
    """The description of any predicate ``allowed(i, j)`` (causality is added): evaluated on
    each tile of queries against every earlier key, in key blocks of ``block`` (default ``tile``;
    ``predicate.block_status``, compiled for long sequences), then once more on the cut blocks, for
    their masks. Runs of full blocks become one FULL interval, runs of cut ones a BAND 0 interval
    when they are exactly causal, else a MASK."""
    block = block or tile
    status = block_status(allowed, n, tile, block, compile)  # (T, nb): 0 empty, 1 full, 2 cut
    masks, is_band = cut_masks(allowed, status, n, tile, block)  # the cut blocks, row-major
    width = status.shape[1] + 1
    flat = torch.nn.functional.pad(status, (0, 1)).flatten()  # a 0 after each tile ends its runs
    cut_before = torch.cumsum(flat == 2, 0) - (flat == 2).long()  # index of a cut block in ``masks``
    edges = torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), edges])
    ends = torch.cat([edges, torch.tensor([flat.numel()])])
    keep = flat[starts] != 0
    starts, ends = starts[keep], ends[keep]
    t, a = starts // width, starts % width
    r1 = torch.clamp((t + 1) * tile, max=n)
    s0, s1 = a * block, torch.minimum((a + ends - starts) * block, r1)
    c0 = cut_before[starts]
    bands = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(is_band, 0)])  # exactly causal blocks
    band = (bands[(c0 + ends - starts).clamp(max=len(is_band))] - bands[c0.clamp(max=len(is_band))]) == ends - starts
    full = flat[starts] == 1
    single = ~full & ~band & (ends - starts == 1) & (r1 - t * tile == tile) & (s1 - s0 == block)
    kind = torch.where(full, FULL, torch.where(band, BAND, MASK))
    arg = torch.zeros_like(starts)
    # One-block masks (most cut runs) are pooled in one piece; the others, one by one.
    pool = _Pool()
    if single.any():
        arg[single] = pool.add(masks[c0[single]]) + torch.arange(int(single.sum())) * (tile * block)
    for e in torch.nonzero(~full & ~band & ~single).flatten().tolist():
        c, nblocks, rows = int(c0[e]), int(ends[e] - starts[e]), int(r1[e] - t[e] * tile)
        sub = masks[c:c + nblocks].permute(1, 0, 2).reshape(tile, -1)[:rows, : int(s1[e] - s0[e])]
        arg[e] = pool.add(sub)  # the run's blocks side by side: [rows, s1 - s0]
    return from_intervals(n, tile, t, torch.zeros_like(t), s0, s1, kind, arg, masks=pool.tensor())


def from_tile_rules(pattern, n: int, tile: int, rules) -> Tiles:
    """A description from per-tile rules: ``rules(r0, r1)`` gives, for the tile of queries r0..r1-1,
    ``(full, window)``: key ranges [a, b) that every query of the tile attends, plus a causal band of
    ``window`` (0: every earlier key); or None, and the tile gets its exact mask from
    ``pattern.allowed``. Ranges are merged and cut at the band; where one reaches into the band,
    that part of the tile is masked exactly. O(tiles) Python steps."""
    entries, pool = [], _Pool()
    for t, r0 in enumerate(range(0, n, tile)):
        r1 = min(n, r0 + tile)
        rule = rules(r0, r1)
        if rule is not None:
            full, window = rule
            lo = max(0, r0 - window + 1) if window else 0
            merged = _merge([(a, min(b, r1)) for a, b in full if a < min(b, r1)])
            if all(b <= lo for _, b in merged):
                entries += [(t, 0, a, b, FULL, 0) for a, b in merged]
                entries.append((t, 0, lo, r1, BAND, window))
                continue
        else:
            lo = 0
            merged = []
        entries += [(t, 0, a, min(b, lo), FULL, 0) for a, b in merged if a < lo]
        i, j = torch.arange(r0, r1)[:, None], torch.arange(lo, r1)[None, :]
        ok = pattern.allowed(i, j) & (j <= i)
        for s, e, kind, m in tile_intervals(ok, r0, tile, lo):
            entries.append((t, 0, s, e, kind, pool.add(m)))
    cols = torch.tensor(entries, dtype=torch.int64).reshape(-1, 6).T
    return from_intervals(n, tile, cols[0], *cols[1:], masks=pool.tensor())


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


class _Pool:
    """The byte masks of MASK intervals, one after another."""

    def __init__(self):
        self.parts: list[torch.Tensor] = []
        self.size = 0

    def add(self, m: torch.Tensor | None) -> int:
        if m is None:
            return 0
        offset = self.size
        self.parts.append(m.reshape(-1).to(torch.uint8))
        self.size += m.numel()
        if self.size >= 2**31:
            raise ValueError("the masks of this pattern's cut tiles need more than 2^31 bytes")
        return offset

    def tensor(self) -> torch.Tensor | None:
        return torch.cat(self.parts) if self.parts else None


@functools.lru_cache(maxsize=64)
def describe(pattern, n: int, tile: int) -> Tiles:
    """``pattern.tiles(n, tile)``, cached (patterns are frozen dataclasses)."""
    return pattern.tiles(n, tile)
