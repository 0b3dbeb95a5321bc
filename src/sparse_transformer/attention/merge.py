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

from .plan import Plan, SubProblem
from .sdpa import Kernel


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(sp: SubProblem, x: torch.Tensor) -> torch.Tensor:
    """Gather a per-row tensor [B*H, N] into the sub-problem's query layout [B*H, G, L]."""
    return sp.q_in(x[..., None])[..., 0]


def sparse_forward(q, k, v, plan: Plan, kernel: Kernel, scale: float):
    """q, k, v [B*H, Np, D] (padded, contiguous).

    Returns O [B*H, Np, D] in q.dtype, L [B*H, Np] in float32 (float64 for
    float64; +inf for a row with no allowed key), and the gathered inputs of
    every sub-problem (kept for the backward).
    """
    BH, N, D = q.shape
    acc = _acc_dtype(q.dtype)
    results = []  # (sub-problem, inputs, o, lse)
    group_lse = []
    for group in plan.groups:
        l_g = q.new_zeros(BH, N, dtype=acc)
        covered = q.new_zeros(BH, N, dtype=torch.bool)
        for sp in group:  # the sub-problems of a group cover disjoint rows
            inputs = (sp.q_in(q), sp.kv_in(k), sp.kv_in(v))
            o, lse = kernel.forward(*inputs, sp.causal, sp.mask(inputs[0]), scale)
            sp.q_out(lse.to(acc)[..., None], l_g[..., None])
            sp.q_out(torch.ones_like(lse, dtype=torch.bool)[..., None], covered[..., None])
            results.append((sp, inputs, o, lse))
        group_lse.append(l_g.masked_fill_(~covered, float("-inf")))

    lse = torch.logsumexp(torch.stack(group_lse), dim=0) if len(group_lse) > 1 else group_lse[0]
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    out = q.new_zeros(BH, N, D, dtype=acc)
    for sp, inputs, o, part_lse in results:
        w = torch.exp(part_lse.to(acc) - _rows(sp, safe))  # (BH, G, L)
        sp.q_out_scaled(o, w, out)  # out[rows] += o * w, without a temporary
    # A row with no allowed key has output 0; +inf makes its softmax weights 0 in the backward.
    lse = torch.where(finite, lse, float("inf"))
    saved = [inputs for _, inputs, _, _ in results]
    return out.to(q.dtype), lse, saved


def sparse_backward(do, out, lse, saved, shape, plan: Plan, kernel: Kernel, scale: float, dtype):
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    dq, dk, dv = (torch.zeros(shape, dtype=acc, device=do.device) for _ in range(3))
    subproblems = [sp for group in plan.groups for sp in group]
    for sp, (qs, ks, vs) in zip(subproblems, saved):
        gq, gk, gv = kernel.backward(
            sp.q_in(do), qs, ks, vs, sp.q_in(out), _rows(sp, lse).contiguous(), sp.causal, sp.mask(qs), scale,
        )
        sp.q_out(gq.to(acc), dq)
        sp.kv_out(gk.to(acc), dk)
        sp.kv_out(gv.to(acc), dv)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: pads to the plan's block, runs the parts, slices back."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, kernel: Kernel, scale: float):
        B, H, n, D = q.shape
        pad = -n % plan.block
        # (B, H, n, D) -> (B*H, Np, D): one copy at most (padding or a non-contiguous input).
        q, k, v = (F.pad(t, (0, 0, 0, pad)).view(B * H, n + pad, D) if pad else t.reshape(B * H, n, D) for t in (q, k, v))
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse, saved = sparse_forward(q, k, v, plan, kernel, scale)
        ctx.save_for_backward(out, lse, *[t for inputs in saved for t in inputs])
        ctx.plan, ctx.kernel, ctx.scale = plan, kernel, scale
        ctx.dims, ctx.dtype = (B, H, n, D), q.dtype
        return out.view(B, H, n + pad, D)[:, :, :n]

    @staticmethod
    def backward(ctx, do):
        out, lse, *flat = ctx.saved_tensors
        saved = [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
        B, H, n, D = ctx.dims
        N = out.shape[1]
        if N != n:
            do = F.pad(do, (0, 0, 0, N - n))
        do = do.reshape(B * H, N, D).contiguous()
        dq, dk, dv = sparse_backward(do, out, lse, saved, out.shape, ctx.plan, ctx.kernel, ctx.scale, ctx.dtype)
        back = lambda g: g.view(B, H, N, D)[:, :, :n]  # noqa: E731
        return back(dq), back(dk), back(dv), None, None, None
