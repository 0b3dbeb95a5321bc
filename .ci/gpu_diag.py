"""Each FlexAttention layout alone, compiled, against the dense mask its block lists and mask_mod stand
for, and the whole pattern's output and gradients against float64: at lengths where rows hold several
full blocks (the first GPU run, 2026-12-04, found Fixed and Strided(256) wrong there; BENCHMARKS.md)."""
import torch

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
    for name, bm in (("tiles", lay.tiles), ("gathered", lay.gathered), ("columns", lay.columns)):
        if bm is None:
            continue
        qq, kk, vv = q, k, v
        if name == "gathered":
            kk, vv = (torch.nn.functional.pad(x[:, :, lay.gather], (0, 0, 0, bm.seq_lengths[1] - lay.gather.numel()))
                      for x in (k, v))
        want = ref(qq, kk, vv, dense(bm, n), 0.125)
        got = compiled(qq, kk, vv, block_mask=bm, scale=0.125).float()
        print(f"{p!r} n={n} {name} layout compiled: max err {float((got - want).abs().max()):.3g} "
              f"(widths {bm.kv_indices.shape[-1]}, {bm.full_kv_indices.shape[-1]})", flush=True)
    x64 = [t.double().cpu().requires_grad_() for t in (q, k, v)]
    whole = attention(*x64, p, backend="reference", scale=0.125)
    wg = torch.autograd.grad(whole, x64, do.double().cpu())
    qc, kc, vc = (t.requires_grad_() for t in (q, k, v))
    got = flex.flex_attention_sparse(qc, kc, vc, p, 0.125)
    gg = torch.autograd.grad(got, (qc, kc, vc), do)
    errs = [float((a.detach().double().cpu() - b).norm() / b.norm()) for a, b in zip((got, *gg), (whole, *wg))]
    print(f"{p!r} n={n}: whole rel err out dq dk dv " + " ".join(f"{e:.1e}" for e in errs), flush=True)


g = torch.Generator(device="cuda").manual_seed(0)
for p, n in ((P.Fixed(128, 32), 4096), (P.Strided(256), 4096), (P.Fixed(128, 16), 8192)):
    try:
        check(p, n)
    except Exception as e:  # noqa: BLE001
        print(f"{p!r} n={n}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)


def profile(p=P.Strided(256), n=16384) -> None:
    """Where a forward+backward's time goes (GPU kernels and host), B1 H8 D64 bf16: the first run's
    Strided forward at 16,384 took longer than dense SDPA's while computing 3.5% of its pairs."""
    from torch.profiler import ProfilerActivity, profile as prof

    q, k, v, do = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    x = [t.requires_grad_() for t in (q, k, v)]
    step = lambda: torch.autograd.grad(attention(*x, p), x, do)  # noqa: E731
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pr:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    print(pr.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
    print(pr.key_averages().table(sort_by="cpu_time_total", row_limit=10, max_name_column_width=60))


try:
    profile()
except Exception as e:  # noqa: BLE001
    print(f"profile: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
