"""A pattern's description (patterns/tiles.py): what the fused kernel reads, checked against the mask."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_transformer as sp
from sparse_transformer import patterns as P
from sparse_transformer.sysutil import compiler_trusted
from sparse_transformer.patterns.tiles import BAND, FULL, MASK, from_allowed, from_intervals

from helpers import every_pattern


@pytest.mark.parametrize("tile", [4, 16, 32])
def test_every_description_covers_its_mask_exactly_once(tile):
    """Each allowed pair is computed exactly once, and no other pair: the intervals of a tile
    are disjoint and the column layout adds only what the tiles leave out."""
    for pattern in every_pattern(6, 2) + every_pattern(16, 4):
        for n in (1, 7, 33, 70):
            for p in pattern.per_head(3):
                assert torch.equal(p.tiles(n, tile).coverage(), p.mask(n).int()), (p, n, tile)


@pytest.mark.parametrize("tile", [4, 32])
def test_row_counts_from_the_description_equal_the_mask(tile):
    """Tiles.row_counts reads FULL, BAND (plain and gathered), MASK intervals and the column layout:
    every pattern's counts equal its mask's row sums, heads and lengths that cut tiles included."""
    kinds = set()
    for pattern in every_pattern(6, 2) + every_pattern(16, 4):
        for n in (1, 7, 33, 70):
            for p in pattern.per_head(3):
                d = p.tiles(n, tile)
                kinds |= {(int(v), int(k)) for v, k in d.iv[:, [0, 3]].tolist()} | ({"columns"} if d.columns else set())
                assert torch.equal(d.row_counts(), p.mask(n).sum(1)), (p, n, tile)
    assert {(0, FULL), (0, BAND), (0, MASK), (1, FULL), "columns"} <= kinds  # each branch ran
    # No registered pattern has a causal band over a gathered view, which the kernel accepts: by hand,
    # queries 4..7 attend the gathered keys 0, 2, 4, 6 up to themselves, within a window of 3.
    t = from_intervals(8, 4, torch.tensor([1]), torch.tensor([1]), torch.tensor([0]), torch.tensor([4]),
                       torch.tensor([BAND]), torch.tensor([3]), gather=torch.tensor([0, 2, 4, 6]))
    assert t.row_counts().tolist() == [0, 0, 0, 0, 2, 1, 2, 1] == t.coverage().sum(1).tolist()


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 90), stride=st.integers(1, 24), data=st.data())
def test_fixed_descriptions_for_any_stride_and_tile(n, stride, data):
    """Tiles that straddle two blocks (tile does not divide stride) get exact byte masks."""
    c = data.draw(st.integers(1, stride))
    tile = data.draw(st.sampled_from([4, 16, 32]))
    head = data.draw(st.integers(0, 3))
    for pattern in (P.Fixed(stride, c, True), P.FixedSummary(stride, c, True), P.FixedBlock(stride)):
        p = pattern.per_head(head + 1)[head]
        assert torch.equal(p.tiles(n, tile).coverage(), p.mask(n).int())


def test_closed_forms_are_o_of_n_over_tile():
    """The paper's patterns describe 2^20 positions in a few intervals per tile and no byte mask."""
    n, tile = 2**20, 32
    for pattern, per_tile in ((P.Strided(1024), 1), (P.Fixed(1024, 32), 2), (P.Fixed(128, 16), 2)):
        t = pattern.tiles(n, tile)
        assert t.iv.shape[0] <= per_tile * n // tile and t.masks.numel() == 0
    assert P.Fixed(1024, 32).tiles(n, tile).gather.numel() == (n // 1024 - 1) * 32


def test_from_allowed_uses_full_band_and_mask_intervals():
    t = from_allowed(lambda i, j: (i - j < 40) | (j < 8) | ((i - j) % 5 == 0), 128, 16)
    kinds = set(t.iv[:, 3].tolist())
    assert {FULL, BAND, MASK} <= kinds
    i = torch.arange(128)
    want = (i[:, None] >= i[None, :]) & ((i[:, None] - i[None, :] < 40) | (i[None, :] < 8)
                                         | ((i[:, None] - i[None, :]) % 5 == 0))
    assert torch.equal(t.coverage(), want.int())


def _per_tile_description(allowed, n, tile, block):
    """The description built the plain way: each tile's whole allowed matrix, classified block by block."""
    from sparse_transformer.patterns.tiles import _Pool, from_intervals, tile_intervals

    entries, pool = [], _Pool()
    for t, r0 in enumerate(range(0, n, tile)):
        r1 = min(n, r0 + tile)
        i, j = torch.arange(r0, r1)[:, None], torch.arange(r1)[None, :]
        ok = allowed(i, j).broadcast_to(r1 - r0, r1) & (j <= i)
        entries += [(t, 0, s, e, kind, pool.add(m)) for s, e, kind, m in tile_intervals(ok, r0, block)]
    cols = torch.tensor(entries, dtype=torch.int64).reshape(-1, 6).T
    return from_intervals(n, tile, cols[0], *cols[1:], masks=pool.tensor())


def _intervals(d):
    """Each tile's intervals, a MASK with its bytes instead of its offset in the pool."""
    out = []
    for t in range(len(d.ptr) - 1):
        rows = min(d.tile, d.n - t * d.tile)
        for view, start, end, kind, arg in d.iv[int(d.ptr[t]): int(d.ptr[t + 1])].tolist():
            if kind == MASK:
                arg = d.masks[arg: arg + rows * (end - start)].tolist()
            out.append((t, view, start, end, kind, arg))
    return out


PREDICATES = [
    lambda i, j: (i - j < 40) | (j < 8) | ((i - j) % 5 == 0),
    lambda i, j: ((j // 48) % 3 == 0) | (i - j < 17),
    lambda i, j: (i // 24 == j // 24) | (j % 24 >= 21),
    lambda i, j: ((i * 7 + j * 3) % 11 < 4),
]


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_from_allowed_equals_the_per_tile_description(compile):
    """Block status in chunks (eager, or compiled as for long sequences), then the cut blocks alone:
    the same intervals and masks as classifying each tile's whole allowed matrix, for lengths that
    are not multiples of the tile, the block or the chunk."""
    for f in PREDICATES:
        for n, tile, block in ((300, 16, 32), (1000, 32, 48), (777, 16, 16)):
            got, want = from_allowed(f, n, tile, block, compile=compile), _per_tile_description(f, n, tile, block)
            assert _intervals(got) == _intervals(want), (n, tile, block)


@pytest.mark.skipif(not compiler_trusted(), reason="compiled evaluation is used only where PyTorch runs at AVX512")
@pytest.mark.slow
def test_many_predicates_compile_each_on_their_own(recwarn):
    """dynamo keeps at most 8 graphs per code object: each predicate's chunk function has its own, so
    the fifth compiled predicate (two graphs each) is still compiled, not evaluated eagerly."""
    for w in range(5):
        f = lambda i, j, w=w: (i - j < 9 + w) | (j % 7 == 0)  # noqa: E731
        assert _intervals(from_allowed(f, 300, 16, 32, compile=True)) == _intervals(_per_tile_description(f, 300, 16, 32))
    assert not [w for w in recwarn if "could not compile" in str(w.message)]


@pytest.mark.skipif(not compiler_trusted(), reason="compiled evaluation is used only where PyTorch runs at AVX512")
@pytest.mark.slow
def test_a_custom_pattern_is_compiled_once_for_every_length(monkeypatch):
    """Past COMPILE_FROM positions (lowered here) a Custom pattern's description is compiled once:
    other lengths reuse the graph, and give the eager description."""
    import torch._dynamo.utils as du
    from sparse_transformer.patterns import predicate

    monkeypatch.setattr(predicate, "COMPILE_FROM", 100)
    p = P.Custom(lambda i, j: (i - j < 9) | (j % 7 == 0), block=16)
    p.tiles(200, 16)
    graphs = du.counters["stats"]["unique_graphs"]
    for n in (150, 333):
        assert _intervals(p.tiles(n, 16)) == _intervals(from_allowed(p.allowed, n, 16, 16, compile=False)), n
    assert du.counters["stats"]["unique_graphs"] == graphs


def test_compiled_evaluation_is_checked_and_used_only_where_trusted(monkeypatch):
    """A compiled chunk function that disagrees with eager evaluation is dropped, with a warning; on a
    CPU where PyTorch does not run at AVX512 nothing is compiled (compile=True says so)."""
    from sparse_transformer.patterns import predicate

    f = lambda i, j: (i - j < 9) | (j % 5 == 0)  # noqa: E731
    want = _intervals(_per_tile_description(f, 200, 16, 32))
    monkeypatch.setattr(predicate, "compiler_trusted", lambda: True)
    monkeypatch.setattr(predicate.torch, "compile", lambda fn, **kw: lambda r0, keys, k0=0: fn(r0, keys, k0) + 1)
    with pytest.warns(UserWarning, match="disagrees with the eager one"):
        assert _intervals(from_allowed(f, 200, 16, 32, compile=True)) == want
    g = lambda i, j: (i - j < 9) | (j % 5 == 0)  # noqa: E731 (another predicate: nothing cached)
    monkeypatch.undo()  # restore torch.compile and compiler_trusted, then mock the capability alone
    monkeypatch.setattr(predicate.torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    with pytest.warns(UserWarning, match="not trusted at AVX2"):
        assert _intervals(from_allowed(g, 200, 16, 32, compile=True)) == want


def test_a_predicate_that_cannot_be_compiled_is_evaluated_eagerly_and_says_so(monkeypatch):
    from sparse_transformer.patterns import predicate

    monkeypatch.setattr(predicate, "compiler_trusted", lambda: True)

    def allowed(i, j):
        if int(i.max()) > 10**9:  # data-dependent Python: no full graph
            return j < 0
        return i - j < 9

    with pytest.warns(UserWarning, match="could not compile it .* eagerly"):
        got = from_allowed(allowed, 200, 16, 32, compile=True)
    assert _intervals(got) == _intervals(_per_tile_description(allowed, 200, 16, 32))


@pytest.mark.parametrize("n", [1, 45, 100])
def test_native_kernel_runs_every_pattern(n):
    """float32 on the CPU: every pattern on the fused kernel, outputs and gradients against the reference,
    one pattern for all heads and one per head."""
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(2, 3, n, 16, generator=g, dtype=torch.float64) for _ in range(4))
    pats = every_pattern(8, 2)[1:]  # Dense runs on one SDPA call
    for pattern in pats + [pats[3:6], [pats[0], pats[6], pats[-1]]]:
        got = [t.float().requires_grad_() for t in (q, k, v)]
        want = [t.clone().requires_grad_() for t in (q, k, v)]
        o = sp.attention(*got, pattern, backend="native")
        r = sp.attention(*want, pattern, backend="reference")
        (o * do.float()).sum().backward()
        (r * do).sum().backward()
        assert torch.allclose(o.double(), r, atol=1e-5), pattern
        for a, b in zip(got, want):
            assert torch.allclose(a.grad.double(), b.grad, atol=1e-5), pattern


def test_mask_mod_equals_the_mask():
    """The predicate handed to FlexAttention (bench attention --against flex) is the pattern."""
    i = torch.arange(70)
    for p in every_pattern(8, 2):
        for q in p.per_head(2):
            assert torch.equal(q.mask_mod(70)(i[:, None], i[None, :]), q.mask(70)), q
    assert torch.equal(P.Longformer(6, (2, 9)).mask_mod(70)(i[:, None], i[None, :]), P.Longformer(6, (2, 9)).mask(70))


@pytest.mark.parametrize("backend", ["native", "cpu", "auto"])
def test_queries_may_be_the_last_positions_of_longer_keys(backend):
    """q [B, H, L, D] with k, v [B, H, N, D]: the queries are positions N-L..N-1 (chunked prefill);
    outputs and gradients equal the last L rows of full attention, for L not a multiple of the tile."""
    g = torch.Generator().manual_seed(1)
    dtype = torch.float64 if backend == "cpu" else torch.float32
    for pattern in every_pattern(8, 2)[1:]:
        for N, L in ((100, 1), (100, 37), (64, 64), (130, 90)):
            q, k, v = (torch.randn(2, 3, N, 16, generator=g, dtype=dtype) for _ in range(3))
            ql = q[:, :, N - L :].clone().requires_grad_()
            kl, vl = k.clone().requires_grad_(), v.clone().requires_grad_()
            got = sp.attention(ql, kl, vl, pattern, backend=backend)
            qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
            want = sp.attention(qd, kd, vd, pattern, backend="reference")[:, :, N - L :]
            assert got.shape == (2, 3, L, 16)
            assert torch.allclose(got.double(), want, atol=1e-5), (pattern, N, L)
            do = torch.randn(2, 3, L, 16, generator=g, dtype=torch.float64)
            (got.double() * do).sum().backward()
            (want * do).sum().backward()
            assert torch.allclose(ql.grad.double(), qd.grad[:, :, N - L :], atol=1e-5), (pattern, N, L)
            assert torch.allclose(kl.grad.double(), kd.grad, atol=1e-5), (pattern, N, L)
            assert torch.allclose(vl.grad.double(), vd.grad, atol=1e-5), (pattern, N, L)


def test_longer_queries_than_keys_are_an_error():
    q, k = torch.randn(1, 2, 10, 8), torch.randn(1, 2, 9, 8)
    with pytest.raises(ValueError, match="L <= N"):
        sp.attention(q, k, k, P.Strided(4))
