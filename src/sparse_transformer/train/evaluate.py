"""Bits per dim: mean negative log-likelihood in nats / ln 2 over a whole split (section 7)."""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..model import SparseTransformer


def autocast_context(device: torch.device, precision: str):
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: SparseTransformer, data: np.ndarray, *, batch_size: int = 8, precision: str = "float32",
    max_bytes: int = 0, progress=None, share: tuple[int, int] = (0, 1), reduce=None,
) -> dict:
    """Deterministic: fixed non-overlapping windows of n_ctx bytes from the start of ``data``.

    The last, shorter window is scored too, so every byte counts once.
    ``share`` = (rank, world): score only every world-th batch, starting at
    rank; ``reduce`` sums [nll] over the processes (then every process gets
    the bits per dim of the whole split).
    """
    n_ctx = model.cfg.n_ctx
    device = next(model.parameters()).device
    total = len(data) if not max_bytes else min(len(data), max_bytes)
    if total < 1:
        raise ValueError("cannot evaluate on an empty split")
    was_training = model.training
    model.eval()
    nll = 0.0
    starts = list(range(0, total - total % n_ctx, n_ctx))
    batches = [starts[i : i + batch_size] for i in range(0, len(starts), batch_size)]
    rank, world = share
    batches = batches[rank::world]
    tail = total % n_ctx if rank == world - 1 else 0  # the last, shorter window: one process scores it
    for idx in batches:
        x = torch.from_numpy(np.stack([np.asarray(data[s : s + n_ctx]) for s in idx]).astype(np.int64)).to(device)
        with autocast_context(device, precision):
            logits = model(x)
        nll += F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x.reshape(-1), reduction="sum").item()
        if progress:
            progress(len(idx) * n_ctx)
    if tail:
        x = torch.from_numpy(np.asarray(data[total - tail : total]).astype(np.int64))[None].to(device)
        with autocast_context(device, precision):
            logits = model(x)
        nll += F.cross_entropy(logits.float()[0], x[0], reduction="sum").item()
    model.train(was_training)
    if reduce is not None:
        nll = reduce([nll])[0]
    nats = nll / total
    return {"bits_per_dim": nats / math.log(2), "nats_per_dim": nats, "bytes": total, "n_ctx": n_ctx}
