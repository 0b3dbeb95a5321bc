"""Sampling by recomputing the full forward pass for each new byte.

Simple and exact; the sparse KV cache of the sampling issue replaces it for long samples.
"""
from __future__ import annotations

import torch

from .model import SparseTransformer


@torch.no_grad()
def generate_naive(
    model: SparseTransformer, n: int, length: int, *, temperature: float = 1.0,
    prompt: bytes = b"", seed: int = 0,
) -> torch.Tensor:
    """n samples of ``length`` bytes after ``prompt``: int64 [n, len(prompt) + length].

    temperature 0 means argmax.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    total = len(prompt) + length
    if total > model.cfg.n_ctx:
        raise ValueError(f"prompt + length = {total} exceeds model.n_ctx={model.cfg.n_ctx}")
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.zeros(n, total, dtype=torch.long, device=device)
    if prompt:
        x[:, : len(prompt)] = torch.tensor(list(prompt), dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    for t in range(len(prompt), total):
        logits = model(x[:, : t + 1])[:, t].float()
        if temperature == 0:
            x[:, t] = logits.argmax(-1)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            x[:, t] = torch.multinomial(probs, 1, generator=g)[:, 0]
    model.train(was_training)
    return x
