"""The exact sparse attention as an autograd function (paper section 5.5).

Forward: each group of sub-problems gives a partial output O_g and log-sum-exp
L_g over its own keys; the exact result is
    L = logsumexp_g L_g,    O = sum_g exp(L_g - L) O_g.
Backward: a fused attention backward only needs the *final* O and L of a row
to give that row's exact gradients restricted to the keys of one sub-problem,
so each sub-problem runs the kernel's backward with the merged O and L, and
the gradients are added up. Nothing of size N x N is ever formed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import Kernel
from .parts import Plan


def _gather_lse(sp, lse: torch.Tensor) -> torch.Tensor:
    return sp.q_in(lse[..., None])[..., 0].contiguous()


def sparse_forward(q, k, v, plan: Plan, kernel: Kernel, scale: float):
    """q, k, v [B, H, Np, D] (padded). Returns O [B, H, Np, D] in q.dtype, L [B, H, Np] in float32 (float64 for float64)
    (+inf for a row with no allowed key)."""
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    outs, lses = [], []
    for group in plan.groups:
        o_g = q.new_zeros(B, H, N, D, dtype=acc)
        l_g = q.new_zeros(B, H, N, 1, dtype=acc)
        covered = q.new_zeros(B, H, N, 1, dtype=acc)
        for sp in group:  # the sub-problems of a group cover disjoint rows
            qs = sp.q_in(q).contiguous()
            ks, vs = sp.kv_in(k).contiguous(), sp.kv_in(v).contiguous()
            o, lse = kernel.forward(qs, ks, vs, sp.causal, sp.mask(qs), scale)
            sp.q_out(o.to(acc), o_g)
            sp.q_out(lse.to(acc)[..., None], l_g)
            sp.q_out(torch.ones_like(lse, dtype=acc)[..., None], covered)
        l_g.masked_fill_(covered == 0, float("-inf"))
        outs.append(o_g)
        lses.append(l_g)
    if len(outs) == 1:
        out, lse = outs[0], lses[0]
    else:
        lse = torch.logsumexp(torch.stack(lses), dim=0)  # (B, H, N, 1)
        finite = torch.where(torch.isfinite(lse), lse, 0.0)
        out = torch.zeros_like(outs[0])
        for o_g, l_g in zip(outs, lses):
            out.addcmul_(o_g, torch.exp(l_g - finite))
    # A row with no allowed key has output 0; +inf makes its softmax weights 0 in the backward.
    lse = torch.where(torch.isfinite(lse), lse, float("inf"))
    return out.to(q.dtype), lse[..., 0]


def sparse_backward(do, q, k, v, out, lse, plan: Plan, kernel: Kernel, scale: float):
    acc = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=k.device)
    dv = torch.zeros(v.shape, dtype=acc, device=v.device)
    for group in plan.groups:
        for sp in group:
            qs = sp.q_in(q).contiguous()
            ks, vs = sp.kv_in(k).contiguous(), sp.kv_in(v).contiguous()
            gq, gk, gv = kernel.backward(
                sp.q_in(do).contiguous(), qs, ks, vs, sp.q_in(out).contiguous(),
                _gather_lse(sp, lse), sp.causal, sp.mask(qs), scale,
            )
            sp.q_out(gq.to(acc), dq)
            sp.kv_out(gk.to(acc), dk)
            sp.kv_out(gv.to(acc), dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: pads to the plan's block, runs the parts, slices back."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, kernel: Kernel, scale: float):
        n = q.shape[2]
        pad = -n % plan.block
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        out, lse = sparse_forward(q, k, v, plan, kernel, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.kernel, ctx.scale, ctx.n = plan, kernel, scale, n
        return out[:, :, :n]

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        n = ctx.n
        if q.shape[2] != n:
            do = F.pad(do, (0, 0, 0, q.shape[2] - n))
        dq, dk, dv = sparse_backward(do.contiguous(), q, k, v, out, lse, ctx.plan, ctx.kernel, ctx.scale)
        return dq[:, :, :n], dk[:, :, :n], dv[:, :, :n], None, None, None
