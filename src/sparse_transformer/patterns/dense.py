"""Full causal attention, S_i = {j : j <= i} (paper section 4.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, back_from
from .registry import register
from .tiles import band


@register("dense")
@dataclass(frozen=True)
class Dense(Pattern):
    """Query i attends every key j <= i."""

    def allowed(self, i, j):
        return j <= i

    def row_counts(self, n):
        return torch.arange(n) + 1

    def row_keys(self, i):
        return torch.arange(i + 1)

    def decomposition(self):
        return [("whole",)]

    def step_keys(self, t, n_ctx):
        return back_from(t, torch.arange(n_ctx, device=t.device))

    def tiles(self, n, tile):
        return band(n, tile, 0)
