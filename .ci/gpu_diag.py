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


g = torch.Generator(device="cuda").manual_seed(0)
for p, n in ((P.Fixed(128, 32), 4096), (P.Fixed(32, 8), 4096), (P.Fixed(128, 32), 1024), (P.Fixed(128, 16), 4096)):
    q, k, v = (torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    lay = flex.block_masks(p, n, 128, "cuda")
    for name, bm in (("tiles", lay.tiles), ("gathered", lay.gathered)):
        kk, vv = (k, v) if name == "tiles" else (torch.nn.functional.pad(x[:, :, lay.gather], (0, 0, 0, bm.seq_lengths[1] - lay.gather.numel())) for x in (k, v))
        want = ref(q, kk, vv, dense(bm, n), 0.125)
        for how, f in (("compiled", compiled), ("eager", flex_attention)):
            try:
                got = f(q, kk, vv, block_mask=bm, scale=0.125).float()
                print(f"{p!r} n={n} {name} {how}: max err {float((got - want).abs().max()):.3g}  kv {tuple(bm.kv_indices.shape)} "
                      f"num {bm.kv_num_blocks.view(-1)[:6].tolist()} full {bm.full_kv_num_blocks.view(-1)[:6].tolist()}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{p!r} n={n} {name} {how}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    whole = attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), p, backend="reference", scale=0.125)
    for sep in (True, False):
        with torch.no_grad():
            got = flex.flex_attention_sparse(q, k, v, p, 0.125, separate_gather=sep)
        print(f"{p!r} n={n} whole, separate_gather={sep}: max err {float((got.double().cpu() - whole).abs().max()):.3g}", flush=True)
