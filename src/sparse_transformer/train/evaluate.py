"""Bits per dim: mean negative log-likelihood in nats / ln 2 over a whole split (section 7), as it
is (``evaluate``) and with the model adapting as it reads (``evaluate_dynamic``)."""
from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import torch

from ..model import SparseTransformer, nll


def autocast_context(device: torch.device, precision: str):
    if precision == "float32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bfloat16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(
    model: SparseTransformer, data: np.ndarray, *, batch_size: int = 8, precision: str = "float32",
    max_bytes: int = 0, min_context: int = 0, progress=None, share: tuple[int, int] = (0, 1), reduce=None,
) -> dict:
    """Deterministic: windows of n_ctx bytes from the start of ``data`` (its first ``max_bytes``).

    Every byte from position ``min_context`` on is scored exactly once, each with at least
    ``min_context`` bytes of context: windows begin ``min_context`` bytes before the first byte
    they score (with 0, the default, they do not overlap). The last, shorter window is scored too.
    ``share`` = (rank, world): score only every world-th batch, starting at rank; ``reduce`` sums
    [nll] over the processes (then every process gets the bits per dim of the whole split).
    """
    n_ctx, k = model.cfg.n_ctx, min_context
    device = next(model.parameters()).device
    total = len(data) if not max_bytes else min(len(data), max_bytes)
    if not 0 <= k < n_ctx:
        raise ValueError(f"min_context must be in [0, {n_ctx - 1}], got {k}")
    if total - k < 1:
        raise ValueError("cannot evaluate on an empty split" if total < 1 else
                         f"{total} bytes leave nothing to score after a minimum context of {k}")
    windows = [(p - k, min(total, p - k + n_ctx)) for p in range(k, total, n_ctx - k)]
    full = [w for w in windows if w[1] - w[0] == n_ctx]
    rank, world = share
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)][rank::world]
    if windows[-1] not in full and rank == world - 1:  # the last, shorter window: one process scores it
        groups.append([windows[-1]])
    was_training = model.training
    model.eval()
    total_nll = 0.0
    for group in groups:
        x = torch.from_numpy(np.stack([np.asarray(data[a:b]) for a, b in group]).astype(np.int64)).to(device)
        with autocast_context(device, precision):
            logits, _ = model(x)
        total_nll += nll(logits[:, k:], x[:, k:], "sum").item()
        if progress:
            progress(x[:, k:].numel())
    model.train(was_training)
    if reduce is not None:
        total_nll = reduce([total_nll])[0]
    nats = total_nll / (total - k)
    return {"bits_per_dim": nats / math.log(2), "nats_per_dim": nats, "bytes": total - k, "n_ctx": n_ctx}


def evaluate_dynamic(
    model: SparseTransformer, data: np.ndarray, *, lr: float, grad_clip: float = 1.0, precision: str = "float32",
    max_bytes: int = 0, progress=None,
) -> dict:
    """Bits per dim with dynamic evaluation (Krause et al. 2018, "Dynamic Evaluation of Neural Sequence
    Models"; 2019 for transformers): the windows of ``evaluate`` (n_ctx bytes, not overlapping) are
    scored in order, and after each one the model takes one SGD step (learning rate ``lr``, gradient
    norm clipped at ``grad_clip``) on the window it has just scored.

    Every byte is still predicted before the model sees it, so the figure is what the model achieves
    as an adaptive one-pass compressor of the split, like bzip2 and xz reading the same bytes: they
    too learn the split's repeats (its identifiers, its names) as they go. The static figure of
    ``evaluate`` is the model's generalisation; this one adds what it learns while reading.
    ``model`` is not changed: a copy adapts. Windows run one at a time (the adaptation is sequential).
    """
    if lr <= 0:
        raise ValueError(f"the learning rate of dynamic evaluation must be > 0, got {lr}")
    n_ctx = model.cfg.n_ctx
    device = next(model.parameters()).device
    total = len(data) if not max_bytes else min(len(data), max_bytes)
    if total < 1:
        raise ValueError("cannot evaluate on an empty split")
    reader = copy.deepcopy(model).eval()  # eval: no dropout; the gradients still flow
    params = [p for p in reader.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr)
    total_nll = 0.0
    with torch.enable_grad():
        for a in range(0, total, n_ctx):
            x = torch.from_numpy(np.asarray(data[a : min(total, a + n_ctx)]).astype(np.int64))[None].to(device)
            with autocast_context(device, precision):
                logits, _ = reader(x)
            loss = nll(logits, x, "sum")  # (1, T) -> nats of the window, scored before the step below
            total_nll += loss.item()
            opt.zero_grad(set_to_none=True)
            (loss / x.numel()).backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if progress:
                progress(x.numel())
    nats = total_nll / total
    return {"bits_per_dim": nats / math.log(2), "nats_per_dim": nats, "bytes": total, "n_ctx": n_ctx, "dynamic_lr": lr}
