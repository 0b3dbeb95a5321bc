import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_transformer import patterns as P

from helpers import every_pattern, informative_model


def brute(pattern, n, head=0):
    """The section 4.3 definitions, written as plainly as possible."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(i + 1):
            if isinstance(pattern, P.Dense):
                ok = True
            elif isinstance(pattern, P.Local):
                ok = i - j < pattern.window
            elif isinstance(pattern, P.Strided):
                ok = i - j < pattern.stride or (i - j) % pattern.stride == 0
            elif isinstance(pattern, P.StridedColumns):
                ok = (i - j) % pattern.stride == 0
            elif isinstance(pattern, P.BigBird):
                g, b = pattern.n_global * pattern.block, pattern.block
                rnd = j // b in P.bigbird._random_blocks(pattern.seed, pattern.n_random_blocks, i // b)
                ok = i - j < pattern.window or j < g or i < g or rnd
            elif isinstance(pattern, P.Longformer):
                ok = i - j < pattern.window or j < pattern.global_positions or i < pattern.global_positions
            elif isinstance(pattern, P.Custom):
                ok = bool(pattern.allowed_fn(torch.tensor(i), torch.tensor(j)))
            elif isinstance(pattern, P.DilatedWindow):
                ok = (i - j) % pattern.dilation == 0 and (i - j) // pattern.dilation < pattern.window
            elif isinstance(pattern, (P.Fixed, P.FixedSummary, P.FixedBlock)):
                l = pattern.stride
                same = j // l == i // l
                if isinstance(pattern, P.FixedBlock):
                    ok = same
                else:
                    c = pattern.c
                    k = head % (l // c) if pattern.distinct_heads else 0
                    summary = l - c * (k + 1) <= j % l < l - c * k
                    ok = summary if isinstance(pattern, P.FixedSummary) else (same or summary)
            m[i, j] = ok
    return m


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 40), stride=st.integers(1, 9), data=st.data())
def test_mask_matches_definition(n, stride, data):
    c = data.draw(st.integers(1, stride))
    head = data.draw(st.integers(0, 5))
    for p in every_pattern(stride, c):
        q = p.per_head(head + 1)[head]
        m = q.mask(n)
        assert m.dtype == torch.bool and m.shape == (n, n)
        assert torch.equal(m, brute(p, n, head)), p
        assert not m.triu(1).any(), "patterns are causal"
        assert q.num_pairs(n) == int(m.sum())
        assert torch.equal(q.row_counts(n), m.sum(1))


@pytest.mark.parametrize("stride,c", [(4, 1), (8, 3), (6, 2)])
def test_factors_union_is_pattern(stride, c):
    for p in (P.Strided(stride), P.Fixed(stride, c), P.Fixed(stride, c, distinct_heads=True)):
        for q in p.per_head(3):
            union = torch.zeros(50, 50, dtype=torch.bool)
            for f in q.factors():
                union |= f.mask(50)
            assert torch.equal(union, q.mask(50))


def test_paper_example_strided():
    m = P.Strided(4).mask(12)
    assert m[11].nonzero().flatten().tolist() == [3, 7, 8, 9, 10, 11]


def test_paper_example_fixed():
    m = P.Fixed(4, 1).mask(12)
    assert m[9].nonzero().flatten().tolist() == [3, 7, 8, 9]


def test_distinct_heads_use_distinct_summaries():
    """Per-head patterns are a list: Fixed with distinct heads is one Fixed per head, each with its summary."""
    p = P.Fixed(8, 2, distinct_heads=True)
    assert p.per_head(5) == [P.Fixed(8, 2, summary=k) for k in (0, 1, 2, 3, 0)]
    assert [q.summary_start() for q in p.per_head(5)] == [6, 4, 2, 0, 6]
    assert P.Fixed(8, 2).per_head(3) == [P.Fixed(8, 2)] * 3
    cols = [set(q.mask(64)[63].nonzero().flatten().tolist()) for q in P.FixedSummary(8, 2, True).per_head(4)]
    assert all(a.isdisjoint(b) for i, a in enumerate(cols) for b in cols[i + 1 :])


def test_density():
    assert P.Dense().density(100) == 1.0
    n = 16384
    assert P.Strided(128).density(n) == pytest.approx(P.Strided(128).num_pairs(n) / (n * (n + 1) / 2))
    assert P.Strided(128).density(n) < 0.03
    assert P.Fixed(128, 16).density(n) < 0.14


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: P.Strided(0), "stride must be >= 1"),
        (lambda: P.Local(0), "window must be >= 1"),
        (lambda: P.Fixed(8, 0), r"c must be in \[1, 8\]"),
        (lambda: P.Fixed(8, 9), r"c must be in \[1, 8\]"),
        (lambda: P.Fixed(0, 1), "stride must be >= 1"),
        (lambda: P.Strided(2.5), "stride must be an integer"),
        (lambda: P.Dense().mask(0), "n must be >= 1"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 60), stride=st.integers(1, 9), data=st.data())
def test_row_keys_match_mask(n, stride, data):
    c = data.draw(st.integers(1, stride))
    head = data.draw(st.integers(0, 4))
    for p in every_pattern(stride, c):
        p = p.per_head(head + 1)[head]
        m = p.mask(n)
        for i in range(n):
            assert p.row_keys(i).tolist() == m[i].nonzero().flatten().tolist(), (p, i)


def test_one_spec_syntax_from_one_registry():
    """patterns.parse builds every registered pattern from its spec, spec() inverts it, and a bad spec
    is one ValueError that lists what exists."""
    cases = {"dense": P.Dense(), "local:5": P.Local(5), "strided:8": P.Strided(8), "strided_columns:8": P.StridedColumns(8),
             "fixed:8:2": P.Fixed(8, 2), "fixed:8:2:true": P.Fixed(8, 2, True), "fixed_block:8": P.FixedBlock(8),
             "fixed_summary:8:2": P.FixedSummary(8, 2), "dilated:4:3": P.DilatedWindow(4, 3),
             "bigbird:64:2:3:64": P.BigBird(64, 2, 3, 64), "bigbird:8:0:1:4:7": P.BigBird(8, 0, 1, 4, 7),
             "longformer:256:16": P.Longformer(256, 16)}
    from sparse_transformer.patterns.registry import _REGISTRY

    ours = {n for n, (cls, _) in _REGISTRY.items() if cls.__module__.startswith("sparse_transformer.")}
    assert sorted(ours) == sorted({s.split(":")[0] for s in cases})
    for text, pattern in cases.items():
        assert P.parse(text) == pattern and P.parse(P.spec(pattern)) == pattern
    for bad, msg in [("nope:1", "unknown pattern 'nope'"), ("fixed:8", "takes stride:c:distinct_heads"),
                     ("strided:x", "integers or true/false"), ("local:0", "window must be >= 1"),
                     ("fixed:8:9", "c must be")]:
        with pytest.raises(ValueError, match=msg) as e:
            P.parse(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"known: bigbird:window:n_global:n_random_blocks:block:\[seed\], dense, dilated:window:dilation, "):
        P.parse("nope")


def test_model_config_bench_and_pictures_take_specs(tmp_path):
    from sparse_transformer.bench.attention import parse_cases
    from sparse_transformer.model.config import ModelConfig

    cfg = ModelConfig(n_ctx=64, d_model=32, n_head=2, pattern="fixed:8:2:true")
    assert cfg.full_pattern() == P.Fixed(8, 2, True)
    with pytest.raises(ValueError, match="model.pattern must be .*'fixed:8:99'"):
        ModelConfig(pattern="fixed:8:99").validate()
    assert [p for _, p in parse_cases("dense,strided,fixed,local:7,fixed_summary:8:2", 1024)] == [
        None, P.Strided(32), P.Fixed(128, 16), P.Local(7), P.FixedSummary(8, 2)]


@pytest.mark.slow
def test_a_spec_trains_and_draws(tmp_path):
    from helpers import run_cli, tiny
    from sparse_transformer.train.loop import train

    summary = train(tiny(tmp_path / "run", ("model.pattern", "fixed:8:2"), steps=2), show_progress=False,
                    echo=lambda *_: None)
    assert summary["steps"] == 2
    r = run_cli("show-pattern", "fixed_summary:8:2", "-n", "32", "-o", tmp_path / "p.png")
    assert r.returncode == 0 and (tmp_path / "p.png").is_file(), r.stderr
    r = run_cli("show-pattern", "fixed:8:99", "-o", tmp_path / "q.png")
    assert r.returncode == 2 and "c must be" in r.stderr and "Traceback" not in r.stderr


def test_a_pattern_added_in_one_file_works_everywhere(recwarn):
    """patterns/dilated.py is the only file that mentions DilatedWindow: it registers itself, and runs in
    attention() (fwd+bwd, exact, one masked SDPA call with a warning said once) and in decoding."""
    import sparse_transformer as sp

    d = P.parse("dilated:4:3")
    n = 50
    m = d.mask(n)
    assert torch.equal(m.sum(1), d.row_counts(n))
    for i in range(n):
        assert torch.equal(torch.nonzero(m[i]).flatten(), d.row_keys(i))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 600, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for backend in ("auto", "cpu"):
        got = sp.attention(q, k, v, d, backend=backend)
        want = sp.attention(q, k, v, d, backend="reference")
        assert torch.allclose(got, want, atol=1e-10)
        ga = torch.autograd.grad(got.sum(), (q, k, v))
        gw = torch.autograd.grad(want.sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(ga, gw))
    assert sum("DilatedWindow has no fast decomposition" in str(w.message) for w in recwarn.list) <= 1
    model = informative_model(n_ctx=40, d_model=32, n_layer=1, n_head=2, pattern="dilated:4:2")
    with torch.no_grad():
        x = torch.randint(0, 256, (1, 40))
        full, _ = model(x)
        cache = model.new_cache(1)
        model(x[:, :10], cache=cache)
        for t in range(10, 20):
            assert torch.allclose(model.step(x[:, t - 1], t, cache), full[:, t], atol=1e-4)


def test_longformer_row_counts_with_scattered_globals():
    """The closed form (window, globals before it, global queries) against the mask, globals anywhere."""
    for p in (P.Longformer(4, (2, 3, 17, 40)), P.Longformer(1, (0,)), P.Longformer(9, 0)):
        for n in (1, 3, 18, 64):
            assert torch.equal(p.row_counts(n), p.mask(n).sum(1)), (p, n)
