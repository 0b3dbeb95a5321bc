"""The pattern interface: which keys j a query i may attend (paper section 4.2).

A pattern is pure index arithmetic. It knows nothing about tensors of
activations: ``attention/`` turns it into dense sub-problems.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .tiles import Tiles


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an int in [low, high], else raise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {allowed}, got {value}")
    return value


COUNT_TILE = 32  # the tile of the description the default ``row_counts`` reads


@dataclass(frozen=True)
class Pattern:
    """Base class. Subclasses define ``allowed`` and ``row_counts``.

    Every pattern is causal: ``allowed(i, j)`` is False whenever j > i.
    A query whose row has no allowed key (possible for some factors, such as
    the summary columns of the fixed pattern at early positions) gets a zero
    output from :func:`sparse_transformer.attention`.
    """

    def allowed(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """Boolean tensor: may query i attend key j? (broadcasts i against j)."""
        raise NotImplementedError

    def row_counts(self, n: int) -> torch.Tensor:
        """Number of keys each of the n queries attends, as an int64 tensor [n].

        The default reads the pattern's description (``tiles``, cached, at a tile of 32 queries): O(intervals) for a closed-form description, and no second pass over the pairs
        for a predicate's; patterns with a closed form for the counts override it."""
        from .tiles import describe

        check_int("n", n, 1)
        return describe(self, n, COUNT_TILE).row_counts()

    def decomposition(self) -> list[tuple] | None:
        """The pattern as disjoint parts for the fused-SDPA decomposition (attention/plan.py, section
        5.5), the CUDA and float64 path: a list of ("whole",), ("band", w), ("columns", l, strict),
        ("blocks", l), ("summaries", l, c, s0) or ("own_summary", l, c, s0); None when the pattern has
        none (it then runs there as one SDPA call with its mask). The KV cache reads it too."""
        return None

    def mask_mod(self, n: int, device: torch.device | str = "cpu"):
        """``allowed`` as a predicate FlexAttention can trace (``backend="flex"``, ``bench attention
        --against flex``): no data-dependent Python, valid for positions below n, any tables it
        reads on ``device``."""
        return self.allowed

    def per_head(self, n_head: int) -> list["Pattern"]:
        """The pattern of each of ``n_head`` heads: this one for all, unless a pattern varies by head
        (Fixed with ``distinct_heads``: head h summarises its own offsets)."""
        return [self] * n_head

    def factors(self) -> tuple["Pattern", ...]:
        """The components whose union is this pattern (section 5.1)."""
        return (self,)

    def row_keys(self, i: int) -> torch.Tensor:
        """The keys query i attends, ascending, as int64 [k] (for decoding with a KV cache, which the paper does not describe).

        The default reads the mask row, O(i); patterns override it with a
        closed form whose size is the row's count.
        """
        j = torch.arange(i + 1)
        return j[self.allowed(torch.tensor(i), j)]

    def tiles(self, n: int, tile: int) -> "Tiles":
        """The description the fused kernel reads (tiles.py): key intervals per tile of queries.

        The default evaluates ``allowed`` once per tile (O(n^2) work, like a block mask);
        patterns with a closed form override it with an O(n / tile) one."""
        from .tiles import from_allowed

        return from_allowed(self.allowed, n, tile)  # a bound method: equal for equal patterns, so compiled once

    @property
    def from_predicate(self) -> bool:
        """Whether ``tiles`` evaluates ``allowed`` on every causal pair (patterns/predicate.py, compiled
        from ``COMPILE_FROM`` positions) rather than following a closed form."""
        return type(self).tiles is Pattern.tiles

    def step_keys(self, t: torch.Tensor, n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys a decoding step at position t (a 0-d tensor) reads, with static shapes: int64 [K]
        positions and bool [K] valid, K the most keys any position below n_ctx reads.

        The default goes through ``row_keys`` on the host (eager only); the paper's patterns override
        it with arithmetic on t, which ``torch.compile`` captures once for every position."""
        K = _max_row(self, n_ctx)
        keys = self.row_keys(int(t)).to(t.device)
        idx = torch.zeros(K, dtype=torch.long, device=t.device)
        idx[: len(keys)] = keys
        return idx, torch.arange(K, device=t.device) < len(keys)

    # ------------------------------------------------------------------ derived
    def mask(self, n: int) -> torch.Tensor:
        """The reference connectivity: a BoolTensor [n, n], True where i may attend j."""
        check_int("n", n, 1)
        idx = torch.arange(n)
        return self.allowed(idx[:, None], idx[None, :])

    def num_pairs(self, n: int) -> int:
        """Number of allowed (query, key) pairs for a sequence of length n."""
        check_int("n", n, 1)
        return int(self.row_counts(n).sum())

    def density(self, n: int) -> float:
        """Allowed pairs as a fraction of the n(n+1)/2 causal pairs (dense = 1.0)."""
        return self.num_pairs(n) / (n * (n + 1) / 2)


@functools.lru_cache(maxsize=64)
def _max_row(pattern: Pattern, n: int) -> int:
    return max(1, int(pattern.row_counts(n).max()))


def back_from(t: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions t - offsets that exist (>= 0), clamped to 0 where they do not: (idx, valid)."""
    idx = t - offsets
    return idx.clamp(min=0), idx >= 0
