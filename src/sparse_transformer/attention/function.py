"""The exact sparse attention as an autograd function (paper section 5.5).

Forward: each group of sub-problems gives a partial output O_g and log-sum-exp
L_g over its own keys; the exact result is
    L = logsumexp_g L_g,    O = sum_g exp(L_g - L) O_g.
Backward: a fused attention backward only needs the *final* O and L of a row
to give that row's exact gradients restricted to the keys of one sub-problem,
so each sub-problem runs the kernel's backward with the merged O and L, and
the gradients are added up. Nothing of size N x N is ever formed.

Internally everything is in the layout [B, N, H, D], which is what a model's
projections produce, so a model pays no transposes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import Kernel
from .parts import Plan, SubProblem


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(sp: SubProblem, x: torch.Tensor) -> torch.Tensor:
    """Gather a per-row tensor [B, N, H] into the sub-problem's query layout [G0, G1, L]."""
    return sp.q_in(x[..., None])[..., 0]


def sparse_forward(q, k, v, plan: Plan, kernel: Kernel, scale: float):
    """q, k, v [B, Np, H, D] (padded, contiguous).

    Returns O [B, Np, H, D] in q.dtype, L [B, Np, H] in float32 (float64 for
    float64; +inf for a row with no allowed key), and the gathered inputs of
    every sub-problem (kept for the backward).
    """
    B, N, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    results = []  # (sub-problem, inputs, o, lse)
    group_lse = []
    for group in plan.groups:
        l_g = q.new_zeros(B, N, H, dtype=acc)
        covered = q.new_zeros(B, N, H, dtype=torch.bool)
        for sp in group:  # the sub-problems of a group cover disjoint rows
            inputs = (sp.q_in(q), sp.kv_in(k), sp.kv_in(v))
            o, lse = kernel.forward(*inputs, sp.causal, sp.mask(inputs[0]), scale)
            lse = lse.to(acc)
            bad = sp.invalid_rows(q)
            if bad is not None:
                lse = lse.masked_fill(bad, float("-inf"))
                o = o.masked_fill(bad[..., None], 0.0)
            sp.q_out(lse[..., None], l_g[..., None])
            sp.q_out(torch.ones_like(lse, dtype=torch.bool)[..., None] if bad is None else ~bad[..., None], covered[..., None])
            results.append((sp, inputs, o, lse))
        group_lse.append(l_g.masked_fill_(~covered, float("-inf")))

    lse = torch.logsumexp(torch.stack(group_lse), dim=0) if len(group_lse) > 1 else group_lse[0]
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, 0.0)
    out = q.new_zeros(B, N, H, D, dtype=acc)
    for sp, inputs, o, part_lse in results:
        w = torch.exp(part_lse - _rows(sp, safe))  # (G0, G1, L)
        sp.q_out(o.to(acc) * w[..., None], out)
    # A row with no allowed key has output 0; +inf makes its softmax weights 0 in the backward.
    lse = torch.where(finite, lse, float("inf"))
    saved = [inputs for _, inputs, _, _ in results]
    return out.to(q.dtype), lse, saved


def sparse_backward(do, out, lse, saved, plan: Plan, kernel: Kernel, scale: float, dtype):
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    dq, dk, dv = (torch.zeros(out.shape, dtype=acc, device=do.device) for _ in range(3))
    subproblems = [sp for group in plan.groups for sp in group]
    for sp, (qs, ks, vs) in zip(subproblems, saved):
        rows = _rows(sp, lse)
        bad = sp.invalid_rows(out)
        if bad is not None:
            rows = rows.masked_fill(bad, float("inf"))
        gq, gk, gv = kernel.backward(
            sp.q_in(do), qs, ks, vs, sp.q_in(out), rows.contiguous(), sp.causal, sp.mask(qs), scale,
        )
        sp.q_out(gq.to(acc), dq)
        sp.kv_out(gk.to(acc), dk)
        sp.kv_out(gv.to(acc), dv)
    return dq.to(dtype), dk.to(dtype), dv.to(dtype)


class SparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: [B, H, N, D] in and out; pads to the plan's block, runs the parts."""

    @staticmethod
    def forward(ctx, q, k, v, plan: Plan, kernel: Kernel, scale: float):
        B, H, n, D = q.shape
        pad = -n % plan.block

        def canonical(t):  # (B, H, n, D) -> (B, Np, H, D), contiguous; free for a model's layout
            t = t.transpose(1, 2)
            return F.pad(t, (0, 0, 0, 0, 0, pad)) if pad else t.contiguous()

        q, k, v = canonical(q), canonical(k), canonical(v)
        out, lse, saved = sparse_forward(q, k, v, plan, kernel, scale)
        ctx.save_for_backward(out, lse, *[t for inputs in saved for t in inputs])
        ctx.plan, ctx.kernel, ctx.scale, ctx.n, ctx.dtype = plan, kernel, scale, n, q.dtype
        return out[:, :n].transpose(1, 2)

    @staticmethod
    def backward(ctx, do):
        out, lse, *flat = ctx.saved_tensors
        saved = [tuple(flat[i : i + 3]) for i in range(0, len(flat), 3)]
        n, N = ctx.n, out.shape[1]
        do = do.transpose(1, 2)
        do = F.pad(do, (0, 0, 0, 0, 0, N - n)) if N != n else do.contiguous()
        dq, dk, dv = sparse_backward(do, out, lse, saved, ctx.plan, ctx.kernel, ctx.scale, ctx.dtype)
        return dq[:, :n].transpose(1, 2), dk[:, :n].transpose(1, 2), dv[:, :n].transpose(1, 2), None, None, None
