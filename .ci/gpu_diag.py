"""Why Fixed(128, 32) on compiled CUDA FlexAttention was wrong (first GPU run, 2026-12-04): each layout
alone, compiled and eager, against the dense mask that its block lists and mask_mod stand for."""
import torch
from torch.nn.attention.flex_attention import flex_attention

from sparse_transformer import patterns as P
from sparse_transformer.attention import attention, flex

compiled = flex.compiled_flex()


def dense(bm, n):
    B, nk = bm.BLOCK_SIZE[0], bm.seq_lengths[1]
    mod = bm.mask_mod(0, 0, torch.arange(n, device="cuda")[:, None], torch.arange(nk, device="cuda")[None, :])
    out = torch.zeros(n, nk, dtype=torch.bool, device="cuda")
    for num, idx, full in ((bm.kv_num_blocks, bm.kv_indices, False), (bm.full_kv_num_blocks, bm.full_kv_indices, True)):
        num, idx = num.view(-1).cpu(), idx.view(num.numel(), -1).cpu()
        for r in range(len(num)):
            for c in idx[r, : int(num[r])].tolist():
                sl = (slice(r * B, r * B + B), slice(c * B, c * B + B))
                out[sl] = True if full else mod[sl]
    return out


def ref(q, k, v, allowed, scale):
    s = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.float())


def check(p, n):
    q, k, v, do = (torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    lay = flex.block_masks(p, n, 128, "cuda")
    bm = lay.gathered
    kk, vv = (torch.nn.functional.pad(x[:, :, lay.gather], (0, 0, 0, bm.seq_lengths[1] - lay.gather.numel())) for x in (k, v))
    want = ref(q, kk, vv, dense(bm, n), 0.125)
    got = compiled(q, kk, vv, block_mask=bm, scale=0.125).float()
    print(f"{p!r} n={n} keys {bm.seq_lengths[1]}: gathered layout compiled max err {float((got - want).abs().max()):.3g}", flush=True)
    x64 = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    whole = attention(*x64, p, backend="reference", scale=0.125)
    wg = torch.autograd.grad(whole, x64, do.double().cpu())
    qc, kc, vc = (t.requires_grad_() for t in (q, k, v))
    got = flex.flex_attention_sparse(qc, kc, vc, p, 0.125)
    gg = torch.autograd.grad(got, (qc, kc, vc), do)
    errs = [float((a.detach().double().cpu() - b).norm() / b.norm()) for a, b in zip((got, *gg), (whole, *wg))]
    print(f"{p!r} n={n} keys {bm.seq_lengths[1]}: whole rel err out dq dk dv " + " ".join(f"{e:.1e}" for e in errs), flush=True)


g = torch.Generator(device="cuda").manual_seed(0)
for to_n in (True, False):
    flex.GATHER_TO_N = to_n
    flex.block_masks.cache_clear()
    for p, n in ((P.Fixed(128, 32), 4096), (P.Fixed(128, 16), 8192)):
        try:
            check(p, n)
        except Exception as e:  # noqa: BLE001
            print(f"{p!r} n={n} GATHER_TO_N={to_n}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
