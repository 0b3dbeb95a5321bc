"""Dilated sliding window: query i attends i, i - d, i - 2d, ... (``window`` keys, dilation d).

Not in the Sparse Transformer paper; a dilated window as in Longformer (Beltagy et al., 2020), here
as an example of a pattern added in one file: it registers itself as ``dilated:window:dilation``.
Viewed as [N/d, d] and transposed, it is a local window of ``window`` in each column (section 5.5):
its description is that column layout alone, so the kernel reads no key it does not use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Pattern, back_from, check_int
from .registry import register
from .tiles import columns_only


@register("dilated", "window", "dilation")
@dataclass(frozen=True)
class DilatedWindow(Pattern):
    """j <= i, (i - j) % dilation == 0 and (i - j) // dilation < window."""

    window: int
    dilation: int

    def __post_init__(self):
        check_int("window", self.window, 1)
        check_int("dilation", self.dilation, 1)

    def allowed(self, i, j):
        d = i - j
        return (d >= 0) & (d % self.dilation == 0) & (d // self.dilation < self.window)

    def row_counts(self, n):
        return torch.clamp(torch.arange(n) // self.dilation + 1, max=self.window)

    def row_keys(self, i):
        return torch.arange(i % self.dilation, i + 1, self.dilation)[-self.window:]

    def step_keys(self, t, n_ctx):
        return back_from(t, self.dilation * torch.arange(self.window, device=t.device))

    def tiles(self, n, tile):
        return columns_only(n, tile, self.dilation, strict=False, window=self.window)
