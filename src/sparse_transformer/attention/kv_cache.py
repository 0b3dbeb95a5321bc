"""KV caches for decoding that follow the pattern (not in the paper, which does not describe its sampling code).

One cache serves one group of heads of one layer. ``write(t, k, v)`` stores
position t, ``fill(k, v)`` positions 0..T-1 at once (prefill); ``read(t)`` returns exactly the keys and values that query t may
attend (in any order: attention does not care). ``write_at`` and ``read_at`` do the same for a
position given as a tensor, with static shapes: ``read_at`` returns the most keys any position
reads, and a mask of the valid ones, so a compiled decoding step is captured once for all positions. A fixed pattern keeps only
the summary columns of finished blocks plus the current block, about c/stride
of a dense cache plus one block; the others keep every position and read only
the allowed ones.
"""
from __future__ import annotations

import torch

from ..patterns import Pattern


class FullCache:
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

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        keys = self.pattern.row_keys(t).to(self.k.device)
        return self.k.index_select(2, keys), self.v.index_select(2, keys)

    def write_at(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k.index_copy_(2, t.view(1), k[:, :, None])
        self.v.index_copy_(2, t.view(1), v[:, :, None])

    def read_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys and values of ``pattern.step_keys(t)``, and which of them are valid: static shapes."""
        idx, valid = self.pattern.step_keys(t, self.k.shape[2])
        return self.k.index_select(2, idx), self.v.index_select(2, idx), valid

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class DenseCache(FullCache):
    """Every position, and a step reads all of 0..t: the dense KV-cache baseline (``bench sample``)."""

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[:, :, : t + 1], self.v[:, :, : t + 1]

    def read_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.k, self.v, torch.arange(self.k.shape[2], device=t.device) <= t


class FixedCache:
    """Fixed(l, c) and its factors (decompositions of "blocks", "summaries" and "own_summary" parts):
    the summaries of finished blocks + the current block.

    Summaries [B, h, (n_ctx / l) * c, D] fill as blocks finish; the block store
    [B, h, l, D] is reused by each new block.
    """

    def __init__(self, pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
        parts = {name: args for name, *args in pattern.decomposition()}
        self.pattern, self.batch = pattern, B
        self.l, self.c, self.s0 = parts["summaries"] if "summaries" in parts else (parts["blocks"][0], 0, 0)
        self.summaries = "summaries" in parts
        self.own_summary_only = "own_summary" in parts  # FixedSummary: of its own block, the summary columns
        nb = -(-n_ctx // self.l)
        self.sk = like.new_zeros(B, h, nb * self.c, dk)
        self.sv = like.new_zeros(B, h, nb * self.c, dv)
        self.bk = like.new_zeros(B, h, self.l, dk)
        self.bv = like.new_zeros(B, h, self.l, dv)

    def write(self, t: int, k: torch.Tensor, v: torch.Tensor) -> None:
        off = t % self.l
        self.bk[:, :, off] = k
        self.bv[:, :, off] = v
        if self.summaries and self.s0 <= off < self.s0 + self.c:
            i = (t // self.l) * self.c + off - self.s0
            self.sk[:, :, i] = k
            self.sv[:, :, i] = v

    def fill(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Positions 0..T-1 at once (prefill): k, v (B, h, T, D); the same state as T writes."""
        T = k.shape[2]
        if self.summaries:
            t = torch.arange(T, device=k.device)
            off = t % self.l
            t = t[(off >= self.s0) & (off < self.s0 + self.c)]
            dest = (t // self.l) * self.c + t % self.l - self.s0
            self.sk[:, :, dest] = k[:, :, t]
            self.sv[:, :, dest] = v[:, :, t]
        start = (T - 1) // self.l * self.l  # the block of the last position
        self.bk[:, :, : T - start] = k[:, :, start:]
        self.bv[:, :, : T - start] = v[:, :, start:]

    def read(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        off, done = t % self.l, (t // self.l) * self.c  # summaries of the finished blocks
        if self.own_summary_only:
            own = slice(self.s0, min(off, self.s0 + self.c - 1) + 1) if off >= self.s0 else slice(0, 0)
        else:
            own = slice(0, off + 1)  # the current block up to t
        k = torch.cat([self.sk[:, :, :done], self.bk[:, :, own]], dim=2)
        v = torch.cat([self.sv[:, :, :done], self.bv[:, :, own]], dim=2)
        return k, v

    def write_at(self, t: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        off = (t % self.l).view(1)
        self.bk.index_copy_(2, off, k[:, :, None])
        self.bv.index_copy_(2, off, v[:, :, None])
        if self.summaries:  # a summary column: also into the summaries (else rewrite what is there)
            ok = (off >= self.s0) & (off < self.s0 + self.c)
            i = (t // self.l) * self.c + (off - self.s0).clamp(0, self.c - 1)
            for store, new in ((self.sk, k), (self.sv, v)):
                store.index_copy_(2, i, torch.where(ok, new, store.index_select(2, i)[:, :, 0])[:, :, None])

    def read_at(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every summary slot and the whole block store, with the valid ones marked."""
        off, done = t % self.l, (t // self.l) * self.c
        valid_s = torch.arange(self.sk.shape[2], device=t.device) < done
        j = torch.arange(self.l, device=t.device)
        valid_b = (j <= off) & (j >= self.s0) & (j < self.s0 + self.c) if self.own_summary_only else j <= off
        k = torch.cat([self.sk, self.bk], dim=2)
        v = torch.cat([self.sv, self.bv], dim=2)
        return k, v, torch.cat([valid_s, valid_b])

    def nbytes(self) -> int:
        return self.sk.nbytes + self.sv.nbytes + self.bk.nbytes + self.bv.nbytes


def make_cache(pattern: Pattern, B: int, h: int, n_ctx: int, dk: int, dv: int, like: torch.Tensor):
    """The cache for heads that use ``pattern``."""
    parts = {name for name, *_ in pattern.decomposition() or []}
    kind = FixedCache if parts and parts <= {"blocks", "summaries", "own_summary"} else FullCache
    return kind(pattern, B, h, n_ctx, dk, dv, like)


class LayerCache:
    """The caches of one layer: (head indices, cache) for each group of heads that share a pattern."""

    def __init__(self, groups: list[tuple[torch.Tensor, FullCache | FixedCache]]):
        self.groups = groups

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
