"""Any pattern from a predicate, like FlexAttention's ``mask_mod`` without the batch and head arguments.

``Custom(allowed, block=32, name="mine")``: ``allowed(q_idx, k_idx)`` takes broadcastable int64
position tensors and returns a bool tensor; the causal condition (k_idx <= q_idx) is always added.
The description (tiles.py) evaluates it once per tile of queries against every earlier key, in key
blocks of ``block``: empty blocks are skipped, full ones read without a mask, cut ones with their
exact byte mask. That costs O(N^2) predicate evaluations once per length (cached), as a block mask
does. A named Custom registers itself: ``model.pattern = "mine"``, ``bench attention --cases mine``
and ``show-pattern mine`` then find it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .base import Pattern, check_int
from .registry import register_instance
from .tiles import Tiles, from_allowed


@dataclass(frozen=True)
class Custom(Pattern):
    allowed_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(compare=True)
    block: int = 32
    name: str | None = None

    def __post_init__(self):
        if not callable(self.allowed_fn):
            raise ValueError(f"Custom needs a callable allowed(q_idx, k_idx), got {type(self.allowed_fn).__name__}")
        check_int("block", self.block, 1)
        if self.name is not None:
            register_instance(self.name, self)

    def allowed(self, i, j):
        i, j = torch.as_tensor(i), torch.as_tensor(j)
        return self._predicate(i, j) & (j <= i)

    def _predicate(self, i, j):
        """``allowed_fn(i, j)``, checked, without the causal condition (``from_allowed`` adds it)."""
        ok = torch.as_tensor(self.allowed_fn(i, j))
        if ok.dtype != torch.bool:
            raise ValueError(f"Custom {self.name or ''}: allowed(q_idx, k_idx) must return a bool tensor, got {ok.dtype}")
        return ok

    def tiles(self, n: int, tile: int) -> Tiles:
        return from_allowed(self._predicate, n, tile, self.block)  # a bound method: compiled once for every length

    @property
    def from_predicate(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"Custom({self.name or getattr(self.allowed_fn, '__name__', 'allowed')}, block={self.block})"
