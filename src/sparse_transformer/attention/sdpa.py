"""Fused dense attention kernels that also return the log-sum-exp (paper section 5.5), and one SDPA
call with a pattern's mask (``masked_sdpa``, the short-sequence path without the native kernel).

The sparse path splits a pattern into dense sub-problems; each is solved by
one of these kernels, and the parts are merged exactly through their
log-sum-exps. A kernel works on q [B, G, L, D], k and v [B, G, S, D] and
returns the output [B, G, L, D] and lse [B, G, L] in float32.

``causal`` is top-left aligned: row r attends columns 0..r (as in PyTorch).
``mask`` is an additive float mask [L, S] (0 or -inf) or None.

Backends:
- "cpu": PyTorch's fused flash-attention kernel for the CPU.
- "cuda": PyTorch's memory-efficient (cutlass) kernel, which takes float32,
  float16 and bfloat16 and an additive bias.
- "math": plain matrix products in float32 (float64 for float64); works on any device. Used for
  devices with no fused kernel, with a warning.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from ..patterns import Pattern

_aten = torch.ops.aten


class Kernel:

    def forward(self, q, k, v, causal, mask, scale):
        raise NotImplementedError

    def backward(self, do, q, k, v, o, lse, causal, mask, scale):
        raise NotImplementedError


class CPUFlash(Kernel):
    """``aten._scaled_dot_product_flash_attention_for_cpu`` and its backward."""


    def forward(self, q, k, v, causal, mask, scale):
        o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, causal, attn_mask=mask, scale=scale
        )
        return o, lse

    def backward(self, do, q, k, v, o, lse, causal, mask, scale):
        return _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, causal, attn_mask=mask, scale=scale
        )


class CUDAEfficient(Kernel):
    """``aten._scaled_dot_product_efficient_attention`` (cutlass) and its backward.

    Its log-sum-exp is padded to a multiple of 32 rows; we keep the padded
    tensor for the backward and hand the caller the first L rows.
    """

    _ALIGN = 32

    @staticmethod
    def _bias(mask, q):
        """The additive mask as a bias [G0, G1, L, S] whose rows start 16-element aligned."""
        if mask is None:
            return None
        L, S = mask.shape
        padded = mask.new_zeros(L, -(-S // 16) * 16)
        padded[:, :S] = mask
        return padded[:, :S].expand(q.shape[0], q.shape[1], L, S)

    def forward(self, q, k, v, causal, mask, scale):
        bias = self._bias(mask, q)
        o, lse, _, _ = _aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale
        )
        return o, lse[..., : q.shape[2]]

    def backward(self, do, q, k, v, o, lse, causal, mask, scale):
        L = q.shape[2]
        padded = -(-L // self._ALIGN) * self._ALIGN
        lse_p = lse.new_zeros(lse.shape[:-1] + (padded,))
        lse_p[..., :L] = lse
        bias = self._bias(mask, q)
        seed = torch.zeros((), dtype=torch.int64, device=q.device)
        dq, dk, dv, _ = _aten._scaled_dot_product_efficient_attention_backward(
            do, q, k, v, bias, o, lse_p, seed, seed, 0.0, [True, True, True, False], causal, scale=scale
        )
        return dq, dk, dv


class Math(Kernel):
    """Explicit matrix products in float32. Memory O(L * S) per call."""


    @staticmethod
    def _ct(t):
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def _scores(self, q, k, causal, mask, scale):
        ct = self._ct(q)
        s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
        if causal:
            L, S = s.shape[-2:]
            keep = torch.ones(L, S, dtype=torch.bool, device=s.device).tril()
            s = s.masked_fill(~keep, float("-inf"))
        if mask is not None:
            s = s + mask.to(ct)
        return s

    def forward(self, q, k, v, causal, mask, scale):
        s = self._scores(q, k, causal, mask, scale)
        lse = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - lse[..., None])
        return torch.matmul(p, v.to(s.dtype)).to(q.dtype), lse

    def backward(self, do, q, k, v, o, lse, causal, mask, scale):
        s = self._scores(q, k, causal, mask, scale)
        p = torch.exp(s - lse[..., None])  # (B, G, L, S)
        ct = s.dtype
        do32 = do.to(ct)
        dv = torch.matmul(p.transpose(-1, -2), do32)
        dp = torch.matmul(do32, v.to(ct).transpose(-1, -2))
        delta = (do32 * o.to(ct)).sum(-1, keepdim=True)
        ds = p * (dp - delta) * scale
        dq = torch.matmul(ds, k.to(ct))
        dk = torch.matmul(ds.transpose(-1, -2), q.to(ct))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_warned: set[str] = set()


def select_kernel(device: torch.device, backend: str) -> Kernel:
    """The kernel for ``backend`` ("auto", "cpu", "cuda" or "math") on ``device``."""
    if backend == "math":
        return Math()
    if backend == "auto":
        if device.type == "cpu":
            return CPUFlash()
        if device.type == "cuda":
            return CUDAEfficient()
        if device.type not in _warned:
            _warned.add(device.type)
            warnings.warn(
                f"sparse_transformer.attention: no fused kernel for device type {device.type!r}; "
                "falling back to the slower 'math' kernel",
                RuntimeWarning,
                stacklevel=3,
            )
        return Math()
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend 'cpu' needs CPU tensors, got device {device}")
        return CPUFlash()
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend 'cuda' needs CUDA tensors, got device {device}")
        return CUDAEfficient()
    raise ValueError(f"unknown backend {backend!r}; allowed: auto, reference, native, cpu, cuda, math")


def default_scale(d: int) -> float:
    return 1.0 / math.sqrt(d)


@functools.lru_cache(maxsize=16)
def _pattern_mask(pats: tuple[Pattern, ...], n: int) -> torch.Tensor:
    """[H or 1, n, n] bool: the pattern of every head (one plane when all heads share it)."""
    masks = torch.stack([p.mask(n) for p in pats])
    return masks[:1] if bool((masks == masks[:1]).all()) else masks


def masked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pats: list[Pattern], scale: float,
                upcast: bool) -> torch.Tensor:
    """One SDPA call with the pattern's boolean mask: the fastest exact path for short sequences on the CPU.

    Queries with no allowed key (only some factor patterns have them) get zeros, as on every other path.
    """
    N = k.shape[2]
    mask = _pattern_mask(tuple(pats), N)[:, N - q.shape[2] :].to(q.device)  # the rows of the queries
    dtype = q.dtype
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    empty = ~mask.any(-1)  # (H or 1, N)
    if bool(empty.any()):
        o = o.masked_fill(empty[..., None], 0.0)
    return o.to(dtype)
