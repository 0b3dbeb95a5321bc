"""Strided attention (paper section 4.3, figure 3b).

A^(1) = the previous ``stride`` positions, A^(2) = every ``stride``-th position
before i. Their union lets every position reach every earlier one in two steps.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, back_from, check_int
from .local import Local
from .registry import register
from .tiles import band, columns_only


@register("strided_columns", "stride")
@dataclass(frozen=True)
class StridedColumns(Pattern):
    """j <= i and (i - j) % stride == 0: the second factor of the strided pattern."""

    stride: int

    def __post_init__(self):
        check_int("stride", self.stride, 1)

    def allowed(self, i, j):
        return (j <= i) & ((i - j) % self.stride == 0)

    def row_counts(self, n):
        return torch.arange(n) // self.stride + 1

    def row_keys(self, i):
        return torch.arange(i % self.stride, i + 1, self.stride)

    def decomposition(self):
        return [("columns", self.stride, False)]

    def step_keys(self, t, n_ctx):
        return back_from(t, self.stride * torch.arange(-(-n_ctx // self.stride), device=t.device))

    def tiles(self, n, tile):
        """No tile intervals: only the transposed layout, diagonal included (section 5.5)."""
        return columns_only(n, tile, self.stride, strict=False)


@register("strided", "stride")
@dataclass(frozen=True)
class Strided(Pattern):
    """j <= i and (i - j < stride or (i - j) % stride == 0); stride ~ sqrt(n)."""

    stride: int

    def __post_init__(self):
        check_int("stride", self.stride, 1)

    def allowed(self, i, j):
        d = i - j
        return (d >= 0) & ((d < self.stride) | (d % self.stride == 0))

    def row_counts(self, n):
        i = torch.arange(n)
        return torch.clamp(i + 1, max=self.stride) + i // self.stride

    def row_keys(self, i):
        local_start = max(0, i - self.stride + 1)
        start = i % self.stride
        far = torch.arange(start, max(start, local_start), self.stride)  # (i - j) % stride == 0, i - j >= stride
        return torch.cat([far, torch.arange(local_start, i + 1)])

    def factors(self):
        return (Local(self.stride), StridedColumns(self.stride))

    def decomposition(self):
        return [("band", self.stride), ("columns", self.stride, True)]

    def step_keys(self, t, n_ctx):
        near = torch.arange(self.stride, device=t.device)  # i - j < stride
        far = self.stride * torch.arange(1, max(2, -(-n_ctx // self.stride)), device=t.device)  # multiples
        return back_from(t, torch.cat([near, far]))

    def tiles(self, n, tile):
        """The band of ``stride`` in tiles, plus the columns in the transposed layout (section 5.5)."""
        return band(n, tile, self.stride, columns=(self.stride, True, 0))
