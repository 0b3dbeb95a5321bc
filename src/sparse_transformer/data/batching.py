"""Deterministic batching: every batch is a pure function of (seed, step, rank, world size).

The global batch of a step is drawn from (seed, step) alone; process ``rank``
of ``world`` takes its contiguous share. So resuming needs no saved loader
state and any number of processes sees the same global batch.
"""
from __future__ import annotations

import numpy as np
import torch


def batch_indices(seed: int, step: int, global_batch: int, n_windows: int) -> np.ndarray:
    """Start indices (in units of ``1``) of the global batch of ``step``: int64 [global_batch]."""
    rng = np.random.Generator(np.random.Philox(key=[seed & (2**64 - 1), step]))
    return rng.integers(0, n_windows, size=global_batch, dtype=np.int64)


def get_batch(
    data: np.ndarray, n_ctx: int, seed: int, step: int, global_batch: int, rank: int = 0, world: int = 1,
    micro: int = 0, n_micro: int = 1, whole_examples: int = 0,
) -> torch.Tensor:
    """The (rank, micro)-th share of step ``step``'s global batch, as int64 [b, n_ctx].

    Text and audio: random windows of n_ctx bytes. Images (``whole_examples`` =
    bytes per example): whole examples, cut to n_ctx.
    """
    if global_batch % (world * n_micro):
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world} x micro-batches {n_micro}")
    if whole_examples:
        n_windows = len(data) // whole_examples
    else:
        n_windows = len(data) - n_ctx + 1
    if n_windows < 1:
        raise ValueError(f"the data ({len(data)} bytes) is shorter than one window of {n_ctx}")
    starts = batch_indices(seed, step, global_batch, n_windows)
    per_rank = global_batch // world
    per_micro = per_rank // n_micro
    lo = rank * per_rank + micro * per_micro
    starts = starts[lo : lo + per_micro]
    if whole_examples:
        starts = starts * whole_examples
    rows = np.stack([np.asarray(data[s : s + n_ctx]) for s in starts])
    return torch.from_numpy(rows.astype(np.int64))
