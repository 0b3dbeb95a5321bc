"""FlexAttention block masks built from the pattern description (attention/flex.py).

What the CPU can check: the constructed BlockMask equals ``create_block_mask`` for every pattern;
the layout and merge code, run with a dense stand-in for ``flex_attention``, gives the reference
outputs and gradients; the compiled CPU ``flex_attention`` forward with these masks equals the
reference (FlexAttention has no CPU backward)."""
from types import SimpleNamespace

import pytest
import torch

from sparse_transformer.attention import attention
from sparse_transformer.attention.flex import block_masks, flex_attention_sparse, padded_length

from helpers import every_pattern

flex_api = pytest.importorskip("torch.nn.attention.flex_attention", reason="this torch has no FlexAttention")


def _sets(num: torch.Tensor, idx: torch.Tensor) -> set[tuple[int, int]]:
    num, idx = num.view(-1), idx.view(num.numel(), -1)
    return {(r, int(c)) for r in range(len(num)) for c in idx[r, : int(num[r])]}


def _blocks(bm) -> tuple[set, set]:
    """(partial, full) (query block, key block) pairs of a BlockMask, from its kv lists."""
    return _sets(bm.kv_num_blocks, bm.kv_indices), _sets(bm.full_kv_num_blocks, bm.full_kv_indices)


def _q_blocks(bm) -> tuple[set, set]:
    """The same pairs from its q lists (what the backward reads), turned back to (query, key)."""
    part = {(q, k) for k, q in _sets(bm.q_num_blocks, bm.q_indices)}
    return part, {(q, k) for k, q in _sets(bm.full_q_num_blocks, bm.full_q_indices)}


def _cases():
    for pattern in every_pattern(8, 2) + every_pattern(32, 8):
        for p in dict.fromkeys(pattern.per_head(2)):
            yield p


def _layouts(lay):
    return [bm for bm in (lay.tiles, lay.gathered, lay.columns) if bm is not None]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("separate_gather", [False, True])
def test_block_masks_equal_create_block_mask(block, separate_gather):
    """Every pattern, every layout: the same partial and full blocks as create_block_mask on the
    layout's own mask_mod, and q lists that are the kv lists transposed."""
    for p in _cases():
        for n in (block, 4 * block, 7 * block):
            n = padded_length(p, n, block)
            for bm in _layouts(block_masks(p, n, block, "cpu", separate_gather)):
                want = flex_api.create_block_mask(bm.mask_mod, None, None, n, bm.seq_lengths[1], device="cpu",
                                                  BLOCK_SIZE=block)
                assert _blocks(bm) == _blocks(want), (p, n, block)
                assert _q_blocks(bm) == _blocks(bm), (p, n, block)


@pytest.mark.parametrize("separate_gather", [False, True])
def test_narrow_block_lists_have_one_width_for_partial_and_full(separate_gather):
    """The lists CUDA gets (as wide as the most blocks of a row): the same blocks as the full-width ones,
    and partial and full lists of one width, kv and q alike (FlexAttention reads them with one stride)."""
    from sparse_transformer import patterns as P

    block, narrower = 16, 0
    for p in [*_cases(), P.Strided(32), P.Fixed(16, 4)]:
        n = padded_length(p, 12 * block, block)
        for narrow, wide in zip(_layouts(block_masks(p, n, block, "cpu", separate_gather, False)),
                                _layouts(block_masks(p, n, block, "cpu", separate_gather, True))):
            assert _blocks(narrow) == _blocks(wide) and _q_blocks(narrow) == _q_blocks(wide), p
            assert narrow.kv_indices.shape == narrow.full_kv_indices.shape, p
            assert narrow.q_indices.shape == narrow.full_q_indices.shape, p
            narrower += narrow.kv_indices.shape[-1] < wide.kv_indices.shape[-1]
    assert narrower > 10  # most layouts need fewer blocks a row than there are


def test_fixed_reads_its_summary_columns_as_a_layout_of_its_own():
    """Off the CPU, Fixed's summary columns are gathered: its tiles layout is block-diagonal and its
    gathered layout is as long as the summaries, so the whole mask costs O(N / block) blocks."""
    from sparse_transformer import patterns as P

    n, block = 2**14, 128
    lay = block_masks(P.Fixed(128, 16), n, block, "cpu", True)
    assert lay.columns is None and lay.merged
    assert int(lay.tiles.kv_num_blocks.sum() + lay.tiles.full_kv_num_blocks.sum()) == n // block
    assert lay.gather.numel() == (n // 128 - 1) * 16 and lay.gathered.seq_lengths[1] == 2048  # a whole block
    inline = block_masks(P.Fixed(128, 16), n, block, "cpu", False)
    assert inline.gathered is None and not inline.merged


@pytest.mark.parametrize("separate_gather", [False, True])
def test_layouts_together_are_the_pattern(separate_gather):
    """The layouts (columns read back in sequence order, gathered keys at their positions) cover
    the mask exactly once."""
    n, block = 256, 16
    for p in _cases():
        n_p = padded_length(p, n, block)
        lay = block_masks(p, n_p, block, "cpu", separate_gather)
        i = torch.arange(n_p)
        total = torch.zeros(n_p, n_p, dtype=torch.int32)
        if lay.tiles is not None:
            total += _dense(lay.tiles, n_p).int()
        if lay.gathered is not None:
            d = _dense(lay.gathered, n_p)[:, : lay.gather.numel()]
            total.index_add_(1, lay.gather, d.int())
        if lay.columns is not None:
            l, M = lay.stride, n_p // lay.stride
            pos = (i % M) * l + i // M  # transposed coordinate -> sequence position
            total[pos[:, None], pos[None, :]] += _dense(lay.columns, n_p).int()
        assert torch.equal(total, p.mask(n_p).int()), p


def _dense(bm, n: int) -> torch.Tensor:
    """The boolean mask [n, keys] a BlockMask stands for: full blocks, and partial ones through its mask_mod."""
    B, n_kv = bm.BLOCK_SIZE[0], bm.seq_lengths[1]
    mod = bm.mask_mod(0, 0, torch.arange(n)[:, None], torch.arange(n_kv)[None, :])
    out = torch.zeros(n, n_kv, dtype=torch.bool)
    part, full = _blocks(bm)
    for qb, kb in part:
        out[qb * B : qb * B + B, kb * B : kb * B + B] = mod[qb * B : qb * B + B, kb * B : kb * B + B]
    for qb, kb in full:
        out[qb * B : qb * B + B, kb * B : kb * B + B] = True
    return out


def stand_in_flex(q, k, v, block_mask, scale, return_aux=None):
    """flex_attention's contract in dense torch ops, with autograd: out, and the natural log-sum-exp
    (-inf and a zero output for a query with no key)."""
    allowed = _dense(block_mask, q.shape[2])
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return (p @ v, SimpleNamespace(lse=lse)) if return_aux is not None else p @ v


def test_layouts_and_merge_with_a_stand_in_give_the_reference():
    """Outputs and q, k, v gradients of every pattern through the flex path's layouts and merge."""
    g = torch.Generator().manual_seed(0)
    n, block = 192, 16
    for p in _cases():
        n_p = padded_length(p, n, block)
        q, k, v, do = (torch.randn(2, 2, n_p, 8, generator=g, dtype=torch.float64) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        got = flex_attention_sparse(q, k, v, p, 0.3, block=block, flex=stand_in_flex, separate_gather=True)
        want = attention(q, k, v, p, backend="reference", scale=0.3)
        torch.testing.assert_close(got, want, msg=lambda m: f"{p}: {m}")
        grads = torch.autograd.grad(got, (q, k, v), do)
        want_grads = torch.autograd.grad(want, (q, k, v), do)
        for a, b in zip(grads, want_grads):
            torch.testing.assert_close(a, b, msg=lambda m: f"{p}: {m}")


@pytest.mark.slow
def test_layouts_and_merge_compiled_as_one_graph():
    """What CUDA runs by default: the transposes, the calls and the merge compiled as one graph (here
    over the stand-in), outputs and gradients equal to the reference, for a merge of band and columns
    and one of a block and its gathered summary columns."""
    import collections
    import functools

    from sparse_transformer import patterns as P
    from sparse_transformer.attention.flex import _layouts_attention

    def traceable_stand_in(q, k, v, block_mask, scale, return_aux=None):  # its mask built beforehand
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~block_mask.dense, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.where(block_mask.dense, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
        return (p @ v, Aux(lse)) if return_aux is not None else p @ v

    Aux = collections.namedtuple("Aux", "lse")
    # traced by dynamo and AOT autograd as in a compile, run without inductor's C++ build (45 s here)
    run = torch.compile(functools.partial(_layouts_attention, flex=traceable_stand_in), dynamic=False,
                        backend="aot_eager", fullgraph=True)
    g = torch.Generator().manual_seed(2)
    for p in (P.Strided(16), P.Fixed(16, 4)):
        n = padded_length(p, 160, 16)
        lay = block_masks(p, n, 16, "cpu", True)
        assert lay.merged
        for bm in _layouts(lay):
            bm.dense = _dense(bm, n)
        q, k, v, do = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(4))
        got = run(q, k, v, lay.tiles, lay.gathered, lay.gather, lay.columns, lay.stride, 0.3)
        want = attention(q, k, v, p, backend="reference", scale=0.3)
        for a, b in zip((got, *torch.autograd.grad(got, (q, k, v), do)),
                        (want, *torch.autograd.grad(want, (q, k, v), do))):
            torch.testing.assert_close(a, b, msg=lambda m: f"{p}: {m}")


def _masked_reference(q, k, v, allowed, scale):
    s = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v


@pytest.mark.slow
def test_compiled_flex_forward_on_the_cpu_equals_reference():
    """FlexAttention itself (compiled; on the CPU a forward without log-sum-exps) with the constructed
    block masks: whole patterns that need one call, and each layout of strided on its own."""
    from sparse_transformer import patterns as P

    flex = flex_api.flex_attention
    compiled = torch.compile(flex, dynamic=False)
    g = torch.Generator().manual_seed(1)
    n, block = 512, 128
    for p in (P.Fixed(64, 8), P.Local(100), P.BigBird(64, 1, 2, 64), P.StridedColumns(64)):
        n_p = padded_length(p, n, block)
        q, k, v = (torch.randn(1, 2, n_p, 16, generator=g) for _ in range(3))
        with torch.no_grad():
            got = flex_attention_sparse(q, k, v, p, 0.25, block=block, flex=compiled)
        want = attention(q, k, v, p, backend="reference", scale=0.25)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5, msg=lambda m: f"{p}: {m}")
        if p != P.StridedColumns(64):  # and backend flex: the whole path compiled as one graph
            with torch.no_grad():
                got = attention(q[:, :, 100:], k, v, p, backend="flex", scale=0.25)
            torch.testing.assert_close(got, want[:, :, 100:], atol=2e-5, rtol=2e-5, msg=lambda m: f"{p}: {m}")
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    for bm in _layouts(block_masks(P.Strided(64), n, block)) + _layouts(block_masks(P.Fixed(64, 8), n, block,
                                                                                      "cpu", True)):
        if bm.seq_lengths[1] < n:
            continue  # the gathered layout: keys of another length, covered by the stand-in test
        with torch.no_grad():
            got = compiled(q, k, v, block_mask=bm, scale=0.25)
        torch.testing.assert_close(got, _masked_reference(q, k, v, _dense(bm, n), 0.25), atol=2e-5, rtol=2e-5)


def _check_on_cuda(p, n: int, dtype, tol: float, g):
    """Backend flex on CUDA against the float64 reference, output and q, k, v gradients (relative error
    at most tol): (the reference output, and the CUDA q, k, v)."""
    q, k, v, do = (torch.randn(1, 2, n, 64, generator=g, dtype=torch.float64) for _ in range(4))
    want = attention(*(t.requires_grad_() for t in (q, k, v)), p, backend="reference")
    want_grads = torch.autograd.grad(want, (q, k, v), do)
    qc, kc, vc = (t.detach().cuda().to(dtype).requires_grad_() for t in (q, k, v))
    got = attention(qc, kc, vc, p, backend="flex")
    grads = torch.autograd.grad(got, (qc, kc, vc), do.cuda().to(dtype))
    for a, b in zip((got, *grads), (want, *want_grads)):
        err = float((a.detach().double().cpu() - b).norm() / b.norm().clamp(min=1e-12))
        assert err <= tol, (p, n, dtype, err)
    return want, qc, kc, vc


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_flex_on_cuda_matches_reference_with_gradients(dtype, tol):
    """Every pattern on backend flex on CUDA (fused kernels, forward and backward), N not a multiple of
    the block, queries as the last positions too: every pattern of stride 32 in bfloat16, and strided and
    fixed in the other types. Each pattern compiles a graph of its own, about 10 s on an H200."""
    from sparse_transformer import patterns as P

    g = torch.Generator().manual_seed(0)
    cases = list(dict.fromkeys(p for x in every_pattern(32, 8) for p in x.per_head(2)))
    if dtype != torch.bfloat16:
        cases = [P.Strided(32), P.Fixed(32, 8)]
    for p in cases:
        if isinstance(p, P.Dense):
            continue  # Dense runs on one SDPA call, not on flex
        want, qc, kc, vc = _check_on_cuda(p, 1000, dtype, tol, g)
        last = attention(qc[:, :, 700:], kc, vc, p, backend="flex")
        assert float((last.double().cpu() - want[:, :, 700:]).abs().max()) <= 50 * tol, p


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_flex_on_cuda_with_many_full_blocks(dtype, tol):
    """The paper's patterns at lengths where rows hold several full blocks and fewer partial ones (at
    N = 1,000 each row holds at most one full block). Fixed(128, 32) at 4,096 was wrong on an H200 when
    the partial and full lists had different widths."""
    from sparse_transformer import patterns as P

    g = torch.Generator().manual_seed(0)
    for p, n in ((P.Fixed(128, 32), 4096), (P.Strided(256), 4096), (P.Fixed(128, 16), 8192)):
        _check_on_cuda(p, n, dtype, tol, g)
