"""Dilated sliding window: query i attends i, i - d, i - 2d, ... (``window`` keys, dilation d).

Not in the Sparse Transformer paper; a dilated window as in Longformer (Beltagy et al., 2020), here
as the example of a pattern added in one file: it registers itself as ``dilated:window:dilation``.
Until the attention engine reads pattern descriptions (issue 18) it runs as one masked SDPA call.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, check_int
from .registry import register


@register("dilated", "window", "dilation")
@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """j <= i, (i - j) % dilation == 0 and (i - j) // dilation < window."""

    window: int
    dilation: int

    def __post_init__(self):
        check_int("window", self.window, 1)
        check_int("dilation", self.dilation, 1)

    def allowed(self, i, j, head=0):
        d = i - j
        return (d >= 0) & (d % self.dilation == 0) & (d // self.dilation < self.window)

    def row_counts(self, n, head=0):
        return torch.clamp(torch.arange(n) // self.dilation + 1, max=self.window)

    def row_keys(self, i, head=0):
        return torch.arange(i % self.dilation, i + 1, self.dilation)[-self.window:]
