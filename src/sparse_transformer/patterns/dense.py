"""Full causal attention, S_i = {j : j <= i} (paper section 4.2)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern
from .registry import register
from .tiles import band


@register("dense")
@dataclass(frozen=True)
class Dense(Pattern):
    """Query i attends every key j <= i."""

    def allowed(self, i, j, head=0):
        return j <= i

    def row_counts(self, n, head=0):
        return torch.arange(n) + 1

    def row_keys(self, i, head=0):
        return torch.arange(i + 1)

    def tiles(self, n, tile, head=0):
        return band(n, tile, 0)
