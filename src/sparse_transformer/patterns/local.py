"""Sliding window: query i attends the ``window`` most recent positions (section 4.3)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, back_from, check_int
from .registry import register
from .tiles import band


@register("local", "window")
@dataclass(frozen=True)
class Local(Pattern):
    """i - window < j <= i. ``Local(stride)`` is the first factor of the strided pattern."""

    window: int

    def __post_init__(self):
        check_int("window", self.window, 1)

    def allowed(self, i, j):
        return (j <= i) & (i - j < self.window)

    def row_counts(self, n):
        return torch.clamp(torch.arange(n) + 1, max=self.window)

    def row_keys(self, i):
        return torch.arange(max(0, i - self.window + 1), i + 1)

    def decomposition(self):
        return [("band", self.window)]

    def step_keys(self, t, n_ctx):
        return back_from(t, torch.arange(self.window, device=t.device))

    def tiles(self, n, tile):
        return band(n, tile, self.window)
