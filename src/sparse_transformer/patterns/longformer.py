"""Longformer (Beltagy et al., 2020), causal: a sliding window plus global positions.

Not in the Sparse Transformer paper; added as one file (issue 18). Query i attends key j <= i when
i - j < ``window``, or j is global, or i is global (a global position attends every earlier one).
``global_positions`` is a count g (the first g positions, as a prefix of task tokens) or a tuple of
positions. Spec: ``longformer:window:g``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, check_int
from .registry import register
from .tiles import Tiles, from_tile_rules


@register("longformer", "window", "global_positions")
@dataclass(frozen=True)
class Longformer(Pattern):
    window: int
    global_positions: int | tuple[int, ...] = 0

    def __post_init__(self):
        check_int("window", self.window, 1)
        if isinstance(self.global_positions, int) and not isinstance(self.global_positions, bool):
            check_int("global_positions", self.global_positions, 0)
        elif isinstance(self.global_positions, tuple):
            for p in self.global_positions:
                check_int("each global position", p, 0)
            object.__setattr__(self, "global_positions", tuple(sorted(set(self.global_positions))))
        else:
            raise ValueError(f"global_positions must be a count or a tuple of positions, got {self.global_positions!r}")

    def positions(self) -> torch.Tensor:
        g = self.global_positions
        return torch.arange(g) if isinstance(g, int) else torch.tensor(g, dtype=torch.long)

    def is_global(self, n: int) -> torch.Tensor:
        """bool [n]: which of positions 0..n-1 are global."""
        flags = torch.zeros(n, dtype=torch.bool)
        g = self.positions()
        flags[g[g < n]] = True
        return flags

    def mask_mod(self, n, device="cpu"):
        is_global = self.is_global(n).to(device)
        return lambda i, j: (j <= i) & ((i - j < self.window) | is_global[j] | is_global[i])

    def allowed(self, i, j):
        i, j = torch.as_tensor(i), torch.as_tensor(j)
        g = self.positions()
        return (j <= i) & ((i - j < self.window) | torch.isin(j, g) | torch.isin(i, g))

    def row_counts(self, n):
        """Query i: every earlier key if i is global, else its window and the global keys before it."""
        check_int("n", n, 1)
        i = torch.arange(n)
        window = torch.clamp(i + 1, max=self.window)
        before = torch.searchsorted(self.positions(), i - self.window, right=True)  # global keys j <= i - window
        return torch.where(self.is_global(n), i + 1, window + before)

    def tiles(self, n: int, tile: int) -> Tiles:
        g = self.positions()
        runs = _runs(g[g < n].tolist())

        def rules(r0: int, r1: int):
            covered = sum(min(b, r1) - max(a, r0) for a, b in runs if a < r1 and b > r0)
            if covered == r1 - r0:
                return [], 0  # global queries attend every earlier key
            if covered:
                return None  # a tile of global and other queries: its exact mask
            return runs, self.window

        return from_tile_rules(self, n, tile, rules)


def _runs(pos: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as ranges of consecutive ones."""
    out: list[list[int]] = []
    for p in pos:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return [(a, b) for a, b in out]
