"""KV caches for decoding that follow the pattern (not in the paper, which does not describe its sampling code).

One cache serves one group of heads of one layer. ``write(t, k, v)`` stores
position t, ``fill(k, v)`` positions 0..T-1 at once (prefill); ``read(t)`` returns the keys and values that query t may
attend (in any order: attention does not care), and None or a mask of the ones it attends. ``write_at`` and ``read_at`` do the same for a
position given as a tensor, with static shapes: ``read_at`` returns the most keys any position
reads, and a mask of the valid ones, so a compiled decoding step is captured once for all positions.
Caches whose reads are a prefix of their store (fixed, dense) also take ``length`` = t + 1 as a Python
int: they then read only the prefix that holds positions below it, a size that a step compiled with
dynamic shapes keeps symbolic (still one graph). A fixed pattern keeps only
the summary columns of finished blocks plus the current block, about c/stride
of a dense cache plus one block; local and strided patterns keep their window in a ring and
(strided) every position in its column; the others keep every position and read only
the allowed ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..patterns import Pattern
from . import native


class Cache:
    """What every cache offers beside its own ``write``, ``fill``, ``read``, ``write_at``, ``read_at``.

    ``native_step``: whether an eager decoding step may read it with the native kernel
    (``step_attention``); the dense KV-cache baseline of ``bench sample`` turns it off, so that it stays
    what it is defined as, ``scaled_dot_product_attention`` over every cached position."""

    native_step: bool = True

    def parts(self, t: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
        """What ``read(t)`` returns, as segments (keys, values) that are views of the stores where a cache
        keeps them apart (a decoding step reads them where they lie), and the mask or None."""
        k, v, mask = self.read(t)
        return [(k, v)], mask


class FullCache(Cache):
    """Every position: [B, h, n_ctx, D]; reads gather ``pattern.row_keys(t)``."""

    def __init__(self, pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
        self.pattern, self.batch = pattern, B
        self.k = like.new_zeros(B, h, n_ctx, dk)
        self.v = like.new_zeros(B, h, n_ctx, dv)

    def write(self, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[:, :, t] = k
        self.v[:, :, t] = v

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0..T-1 at once (prefill): k, v (B, h, T, D)."""
        T = k.shape[2]
        self.k[:, :, :T] = k
        self.v[:, :, :T] = v

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        keys = self.pattern.row_keys(t).to(self.k.device)
        return self.k.index_select(2, keys), self.v.index_select(2, keys), None

    def write_at(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(2, t.view(1), k[:, :, None])
        self.v.index_copy_(2, t.view(1), v[:, :, None])

    def read_at(self, t: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values of ``pattern.step_keys(t)``, and which of them are valid: static shapes
        (``length`` is not used)."""
        idx, valid = self.pattern.step_keys(t, self.k.shape[2])
        return self.k.index_select(2, idx), self.v.index_select(2, idx), valid

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DenseCache(FullCache):
    """Every position, and a step reads all of 0..t: the dense pattern's cache, and the dense KV-cache
    baseline of ``bench sample``."""

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        return self.k[:, :, : t + 1], self.v[:, :, : t + 1], None

    def read_at(self, t: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The store with positions up to t marked, or its first ``length`` positions and None (all read)."""
        if length is not None:  # positions 0..t, every one read
            return self.k[:, :, :length], self.v[:, :, :length], None
        return self.k, self.v, torch.arange(self.k.shape[2], device=t.device) <= t


class FixedCache(Cache):
    """Fixed(l, c) and its factors (decompositions of "blocks", "summaries" and "own_summary" parts):
    the summaries of finished blocks + the current block, in one store per tensor.

    Store [B, h, nb * c + l, D] (nb blocks of the context): slots [0, b c) hold the summaries of
    the finished blocks 0..b-1, and the current block b lives at [b c, b c + l). When block b + 1
    begins, block b's c summary columns move to [b c, b c + c) and the new block starts right
    after them. So what position t = b l + off reads is the contiguous prefix [0, b c + off]: a view,
    with no copy (FixedSummary, which reads only its own block's summary columns, masks the rest).
    """

    def __init__(self, pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
        parts = {name: args for name, *args in pattern.decomposition()}
        self.pattern, self.batch = pattern, B
        self.l, self.c, self.s0 = parts["summaries"] if "summaries" in parts else (parts["blocks"][0], 0, 0)
        self.own_summary_only = "own_summary" in parts  # FixedSummary: of its own block, the summary columns
        nb = -(-n_ctx // self.l)
        self.k = like.new_zeros(B, h, nb * self.c + self.l, dk)
        self.v = like.new_zeros(B, h, nb * self.c + self.l, dv)

    def _finish(self, b: int) -> None:
        """Block b is done: its summary columns move to the slots of block b's summaries."""
        if self.c and b >= 0:
            src = slice(b * self.c + self.s0, b * self.c + self.s0 + self.c)
            for store in (self.k, self.v):
                store[:, :, b * self.c : (b + 1) * self.c] = store[:, :, src].clone()

    def write(self, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        b, off = divmod(t, self.l)
        if off == 0:
            self._finish(b - 1)
        self.k[:, :, b * self.c + off] = k
        self.v[:, :, b * self.c + off] = v

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0..T-1 at once (prefill): k, v (B, h, T, D); the same state as T writes."""
        T = k.shape[2]
        b = (T - 1) // self.l  # the block of the last position
        if self.c and b:
            t = torch.arange(b * self.l, device=k.device)
            t = t[(t % self.l >= self.s0) & (t % self.l < self.s0 + self.c)]  # summary columns of blocks < b
            self.k[:, :, : b * self.c] = k[:, :, t]
            self.v[:, :, : b * self.c] = v[:, :, t]
        self.k[:, :, b * self.c : b * self.c + T - b * self.l] = k[:, :, b * self.l :]
        self.v[:, :, b * self.c : b * self.c + T - b * self.l] = v[:, :, b * self.l :]

    def _own_mask(self, j: torch.Tensor, start, off) -> torch.Tensor:
        """Which slots j of the store position t reads (block b at ``start``, t at ``off`` in it)."""
        own = j - start
        ok = (j < start) | ((own >= 0) & (own <= off))
        if self.own_summary_only:
            ok &= (own < 0) | ((own >= self.s0) & (own < self.s0 + self.c))
        return ok

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys, values and None (every one is read), or a mask of the ones read (FixedSummary)."""
        b, off = divmod(t, self.l)
        end = b * self.c + off + 1
        k, v = self.k[:, :, :end], self.v[:, :, :end]
        if not self.own_summary_only:
            return k, v, None
        return k, v, self._own_mask(torch.arange(end, device=k.device), b * self.c, off)

    def write_at(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        b, off = t // self.l, t % self.l
        if self.c:  # the first position of a block: the previous block's summaries move (else rewrite in place)
            prev = (b - 1).clamp(min=0) * self.c
            src, dst = prev + self.s0 + torch.arange(self.c, device=t.device), prev + torch.arange(self.c, device=t.device)
            move = (off == 0) & (b > 0)
            for store in (self.k, self.v):
                store.index_copy_(2, dst, torch.where(move, store.index_select(2, src), store.index_select(2, dst)))
        slot = (b * self.c + off).view(1)
        self.k.index_copy_(2, slot, k[:, :, None])
        self.v.index_copy_(2, slot, v[:, :, None])

    def read_at(self, t: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The whole store (a view, static shapes), or with ``length`` = t + 1 the prefix [0, b c + off]
        that t reads, with the slots position t reads marked (None: all of them)."""
        size = self.k.shape[2]
        if length is not None:  # a symbolic size in a compiled step
            size = ((length - 1) // self.l) * self.c + (length - 1) % self.l + 1
            if not self.own_summary_only:  # every slot of the prefix is read
                return self.k[:, :, :size], self.v[:, :, :size], None
        j = torch.arange(size, device=t.device)
        return self.k[:, :, :size], self.v[:, :, :size], self._own_mask(j, (t // self.l) * self.c, t % self.l)

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class BandColumnsCache(Cache):
    """Local(w), Strided(l) and StridedColumns(l) (decompositions of "band" and "columns" parts, section
    5.5): the last w positions in a ring [B, h, w, D] (slot p % w), and every position in its column,
    [B, h, l, M, D] (position m l + c at [c, m]), so that a step's column keys are one contiguous slice
    instead of keys l apart in the whole context. A Local cache keeps only its ring."""

    def __init__(self, pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
        parts = {name: args for name, *args in pattern.decomposition()}
        self.pattern, self.batch = pattern, B
        self.w = parts["band"][0] if "band" in parts else 0
        self.l, self.strict = parts["columns"] if "columns" in parts else (0, False)
        self.rk, self.rv = (like.new_zeros(B, h, self.w, d) for d in (dk, dv))  # the ring
        M = -(-n_ctx // self.l) if self.l else 0
        self.ck, self.cv = (like.new_zeros(B, h, self.l, M, d) for d in (dk, dv))  # the columns

    def write(self, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.w:
            self.rk[:, :, t % self.w], self.rv[:, :, t % self.w] = k, v
        if self.l:
            self.ck[:, :, t % self.l, t // self.l], self.cv[:, :, t % self.l, t // self.l] = k, v

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0..T-1 at once (prefill): k, v (B, h, T, D); the same state as T writes."""
        B, h, T, _ = k.shape
        if self.w:
            last = torch.arange(max(0, T - self.w), T, device=k.device)
            self.rk.index_copy_(2, last % self.w, k[:, :, last])
            self.rv.index_copy_(2, last % self.w, v[:, :, last])
        if self.l:
            M = -(-T // self.l)
            for store, x in ((self.ck, k), (self.cv, v)):
                x = torch.nn.functional.pad(x, (0, 0, 0, M * self.l - T))  # (B, h, M l, D) -> [c, m]
                store[:, :, :, :M] = x.view(B, h, M, self.l, -1).transpose(2, 3)

    def parts(self, t: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], None]:
        """The ring (slots 0..t before it is full) and column t % l, rows before t // l (and t's own
        unless strict): two views, no copy."""
        parts = []
        if self.w:
            parts.append((self.rk[:, :, : t + 1], self.rv[:, :, : t + 1]))
        if self.l:
            m = t // self.l + (0 if self.strict else 1)
            parts.append((self.ck[:, :, t % self.l, :m], self.cv[:, :, t % self.l, :m]))
        return parts, None

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        parts, _ = self.parts(t)
        if len(parts) == 1:
            return (*parts[0], None)
        return torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2), None

    def write_at(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.w:
            self.rk.index_copy_(2, (t % self.w).view(1), k[:, :, None])
            self.rv.index_copy_(2, (t % self.w).view(1), v[:, :, None])
        if self.l:
            slot = ((t % self.l) * self.ck.shape[3] + t // self.l).view(1)  # [c, m] in the flattened store
            self.ck.view(*self.ck.shape[:2], -1, self.ck.shape[-1]).index_copy_(2, slot, k[:, :, None])
            self.cv.view(*self.cv.shape[:2], -1, self.cv.shape[-1]).index_copy_(2, slot, v[:, :, None])

    def read_at(self, t: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ring and column t % l, with the slots position t reads marked: static shapes (``length``
        is not used)."""
        ks, vs, valid = [], [], []
        if self.w:
            ks.append(self.rk)
            vs.append(self.rv)
            valid.append(torch.arange(self.w, device=t.device) <= t)
        if self.l:
            c = (t % self.l).view(1)
            ks.append(self.ck.index_select(2, c)[:, :, 0])
            vs.append(self.cv.index_select(2, c)[:, :, 0])
            m = torch.arange(self.ck.shape[3], device=t.device)
            valid.append(m < t // self.l if self.strict else m <= t // self.l)
        return torch.cat(ks, 2), torch.cat(vs, 2), torch.cat(valid)

    def nbytes(self) -> int:
        return self.rk.nbytes + self.rv.nbytes + self.ck.nbytes + self.cv.nbytes


def step_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor | None,
                   scale: float, use_native: bool = True) -> torch.Tensor | None:
    """One decoding step: q (B, h, D) attends the segments ``parts`` of a cache (``Cache.parts``), the keys
    ``mask`` marks (None: all); -> (B, h, D) in float32, or None when it may attend no key (its output is
    zero, as in ``attention()``). On the CPU in float32 the native kernel reads the segments where they
    lie (``native/decode.c``, unless ``use_native`` is False); otherwise they are joined for ``scaled_dot_product_attention``."""
    if sum(k.shape[2] for k, _ in parts) == 0 or (mask is not None and not mask.any()):
        return None
    if use_native and mask is None and native.decode_fits(q, parts) and native.available(q.shape[-1]):
        return native.decode_attention(q, parts, scale)
    k, v = (torch.cat(x, 2) if len(x) > 1 else x[0] for x in zip(*parts))
    return _sdpa_step(q, k, v, mask, scale)


def _sdpa_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """q (B, h, D) against k, v (B, h, K, D), the keys ``mask`` (K,) marks (None: all), by SDPA in float32."""
    o = F.scaled_dot_product_attention(q[:, :, None].float(), k.float(), v.float(),
                                       attn_mask=None if mask is None else mask[None, :], scale=scale)
    return o[:, :, 0]


def static_step_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                          scale: float, use_native: bool = True) -> torch.Tensor:
    """The step of ``read_at``'s static shapes (a compiled decoding step): q (B, h, D) attends k, v (B, h, K, D),
    the keys ``valid`` (K,) marks (None: all); -> (B, h, D) in float32, zero where no key is valid. With every
    key valid, on the CPU in float32, the native kernel reads k and v where they lie (a custom operator, which
    a compiled graph calls as it is); otherwise ``scaled_dot_product_attention`` with the mask."""
    if use_native and valid is None and native.decode_fits(q, [(k, v)]) and native.available(q.shape[-1]):
        return native.decode_attention(q, [(k, v)], scale)
    o = _sdpa_step(q, k, v, valid, scale)
    return o if valid is None else torch.where(valid.any(), o, 0.0)  # no valid key: zero


def make_cache(pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
    """The cache for heads that use ``pattern``."""
    parts = {name: args for name, *args in pattern.decomposition() or []}
    if set(parts) == {"whole"}:
        kind = DenseCache
    elif parts and set(parts) <= {"blocks", "summaries", "own_summary"}:
        kind = FixedCache
    elif parts and set(parts) <= {"band", "columns"} and len(parts.get("columns", (0, 0))) == 2 and not (
            "band" in parts and "columns" in parts and not parts["columns"][1]):  # the parts must not overlap
        kind = BandColumnsCache
    else:
        kind = FullCache
    return kind(pattern, B, h, n_ctx, dk, dv, like)


def _device(cache: Cache) -> torch.device:
    return next(x.device for x in vars(cache).values() if torch.is_tensor(x))


class LayerCache:
    """The caches of one layer: (head indices, cache) for each group of heads that share a pattern."""

    def __init__(self, groups: list[tuple[torch.Tensor, Cache]]):
        self.groups = groups
        # One group of every head in order (the usual case) is read with a slice: no gather of q, k, v
        # and no scatter of the output at each decoding step. Otherwise the head indices, on the device
        # of the group's stores.
        self.whole = len(groups) == 1 and torch.equal(groups[0][0].cpu(), torch.arange(len(groups[0][0])))
        self.selections = [(slice(None) if self.whole else heads.to(_device(cache)), cache) for heads, cache in groups]

    def __iter__(self):
        return iter(self.groups)

    def nbytes(self) -> int:
        return sum(cache.nbytes() for _, cache in self.groups)


class ModelCache:
    """A model's KV cache (``model.new_cache(batch)``): one ``LayerCache`` per block, for ``batch``
    sequences. Prefill fills it (``model(x, cache=cache)``), decoding steps read and extend it."""

    def __init__(self, layers: list[LayerCache], batch: int):
        self.layers, self.batch = layers, batch

    def __iter__(self):
        return iter(self.layers)

    def __getitem__(self, i: int) -> LayerCache:
        return self.layers[i]

    def __len__(self) -> int:
        return len(self.layers)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def tensors(self):
        """Every store of every cache (``generate`` marks them static for the compiled step)."""
        for layer in self.layers:
            for _, cache in layer:
                yield from (x for x in vars(cache).values() if torch.is_tensor(x))
