"""The test oracle: dense masked softmax attention. O(N^2) time and memory."""
from __future__ import annotations

import torch

from ..patterns import Pattern


def reference_attention(q, k, v, patterns: list[Pattern], scale: float) -> torch.Tensor:
    """q [B, H, L, D] (the last L positions), k, v [B, H, N, D]; ``patterns`` has one pattern per head.

    Computes in float32 (float64 for float64 inputs). A row with no allowed key
    gives zeros.
    """
    L, N = q.shape[2], k.shape[2]
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32
    masks = torch.stack([p.mask(N)[N - L :] for p in patterns]).to(q.device)  # (H, L, N)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale  # (B, H, L, N)
    s = s.masked_fill(~masks, float("-inf"))
    empty = ~masks.any(-1, keepdim=True)  # (H, L, 1)
    p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.matmul(p, v.to(ct)).to(q.dtype)
