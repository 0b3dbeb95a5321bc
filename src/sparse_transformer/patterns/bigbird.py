"""BigBird (Zaheer et al., 2020), causal: a sliding window, global tokens and random blocks.

Not in the Sparse Transformer paper; added as one file (issue 18). Query i attends key j <= i when
- i - j < ``window`` (the sliding window), or
- j or i is one of the first ``n_global`` blocks of ``block`` positions (global tokens), or
- j's block is one of the ``n_random_blocks`` earlier blocks drawn for i's block, seeded by ``seed``.
Spec: ``bigbird:window:n_global:n_random_blocks:block[:seed]``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .base import Pattern, check_int
from .registry import register
from .tiles import Tiles, from_tile_rules


@functools.lru_cache(maxsize=None)
def _random_blocks(seed: int, count: int, qb: int) -> tuple[int, ...]:
    """The ``count`` earlier blocks that query block ``qb`` attends (all of them when fewer exist)."""
    if qb <= count:
        return tuple(range(qb))
    g = torch.Generator().manual_seed(seed * 1_000_003 + qb)
    return tuple(sorted(torch.randperm(qb, generator=g)[:count].tolist()))


@register("bigbird", "window", "n_global", "n_random_blocks", "block", "seed")
@dataclass(frozen=True)
class BigBird(Pattern):
    window: int
    n_global: int
    n_random_blocks: int
    block: int
    seed: int = 0

    def __post_init__(self):
        check_int("window", self.window, 1)
        check_int("n_global", self.n_global, 0)
        check_int("n_random_blocks", self.n_random_blocks, 0)
        check_int("block", self.block, 1)
        check_int("seed", self.seed, 0)

    def random_table(self, n_blocks: int) -> torch.Tensor:
        """bool [n_blocks, n_blocks]: may query block a attend key block b (the random part)?"""
        t = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
        for qb in range(n_blocks):
            t[qb, list(_random_blocks(self.seed, self.n_random_blocks, qb))] = True
        return t

    def mask_mod(self, n, device="cpu"):
        table = self.random_table(-(-n // self.block)).to(device)
        g, b, w = self.n_global * self.block, self.block, self.window
        return lambda i, j: (j <= i) & ((i - j < w) | (j < g) | (i < g) | table[i // b, j // b])

    def allowed(self, i, j):
        i, j = torch.as_tensor(i), torch.as_tensor(j)
        g = self.n_global * self.block
        nb = int(max(int(i.max()), int(j.max()), 0)) // self.block + 1
        rnd = self.random_table(nb)[i // self.block, j // self.block]
        return (j <= i) & ((i - j < self.window) | (j < g) | (i < g) | rnd)

    def tiles(self, n: int, tile: int) -> Tiles:
        g = self.n_global * self.block

        def rules(r0: int, r1: int):
            qb = r0 // self.block
            if r1 <= g:  # global queries attend every earlier key
                return [], 0
            if r0 < g or (r1 - 1) // self.block != qb:
                return None  # a tile across two kinds of query: its exact mask
            randoms = _random_blocks(self.seed, self.n_random_blocks, qb)
            return [(0, g)] + [(b * self.block, (b + 1) * self.block) for b in randoms], self.window

        return from_tile_rules(self, n, tile, rules)
