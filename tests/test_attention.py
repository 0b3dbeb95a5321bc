import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sparse_transformer as sp
from sparse_transformer import patterns as P

from helpers import every_pattern

BACKENDS = ["auto", "cpu", "math"]


def rel_err(a, b):
    """Largest error relative to the largest reference value (at least 1: inputs are N(0, 1))."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1.0)).item()


def run(q, k, v, pattern, backend, do):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o = sp.attention(q, k, v, pattern, backend=backend)
    o.backward(do)
    return o.detach(), q.grad, k.grad, v.grad


def compare(pattern, B, H, N, D, dtype, backend, tol, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, N, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(4))
    got = run(q, k, v, pattern, backend, do)
    want = run(q.double(), k.double(), v.double(), pattern, "reference", do.double())
    for name, a, b in zip("o dq dk dv".split(), got, want):
        assert a.dtype == dtype
        assert torch.isfinite(a).all(), name
        assert rel_err(a, b) <= tol, (name, rel_err(a, b))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    N=st.integers(1, 150),
    D=st.sampled_from([4, 16, 32]),
    stride=st.integers(1, 20),
    data=st.data(),
)
def test_matches_reference_float64(B, H, N, D, stride, data):
    c = data.draw(st.integers(1, stride))
    backend = data.draw(st.sampled_from(BACKENDS))
    for pattern in every_pattern(stride, c):
        compare(pattern, B, H, N, D, torch.float64, backend, 1e-5)


@pytest.mark.parametrize("N", [1, 17, 64, 200, 301])
@pytest.mark.parametrize("pattern", every_pattern(16, 4), ids=repr)
def test_matches_reference_float32(pattern, N):
    compare(pattern, 2, 2, N, 32, torch.float32, "auto", 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", [P.Strided(16), P.Fixed(16, 4), P.Dense(), P.Local(10)], ids=repr)
def test_matches_reference_low_precision(pattern, dtype):
    compare(pattern, 1, 2, 203, 32, dtype, "auto", 2e-2)


NATIVE = [P.Strided(1), P.Strided(5), P.Strided(16), P.Local(1), P.Local(9), P.StridedColumns(6)]


@pytest.mark.parametrize("N", [1, 15, 16, 17, 100, 257])
@pytest.mark.parametrize("D", [8, 16, 64])
@pytest.mark.parametrize("pattern", NATIVE, ids=repr)
def test_native_kernel_matches_reference(pattern, D, N):
    compare(pattern, 2, 2, N, D, torch.float32, "native", 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_native_kernel_low_precision(dtype):
    compare(P.Strided(16), 1, 2, 203, 32, dtype, "native", 2e-2)


@pytest.mark.slow
def test_native_kernel_long_and_per_head():
    compare(P.Strided(64), 1, 3, 4100, 64, torch.float32, "native", 1e-5)
    compare([P.Local(8), P.StridedColumns(8), P.Strided(8)], 2, 3, 90, 16, torch.float32, "native", 1e-5)
    # a column of 600 keys: the column pass works on more keys than one tile
    compare(P.Strided(4), 1, 1, 2400, 32, torch.float32, "native", 1e-5)


def test_native_kernel_refuses_what_it_cannot_do():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="Dense runs on one causal SDPA call"):
        sp.attention(q, q, q, P.Dense(), backend="native")
    with pytest.raises(ValueError, match="computes in float32"):
        sp.attention(q.double(), q.double(), q.double(), P.Strided(4), backend="native")


def test_per_head_patterns():
    pats = [P.Local(8), P.StridedColumns(8), P.Fixed(8, 2), P.Dense()]
    compare(pats, 2, 4, 90, 16, torch.float64, "auto", 1e-5)
    compare(pats, 2, 4, 90, 16, torch.float32, "auto", 1e-5)
    # heads of one pattern that are not next to each other (gathered, then put back)
    mixed = [P.Local(8), P.Fixed(8, 2), P.Local(8), P.Fixed(8, 2)]
    compare(mixed, 2, 4, 90, 16, torch.float64, "auto", 1e-5)
    compare(mixed, 1, 4, 90, 16, torch.float32, "auto", 1e-5)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("pattern", every_pattern(16, 4), ids=repr)
def test_one_sequence_shared_by_threads(pattern, threads):
    """B = H = 1: the threads share one sequence's backward (each a run of tiles, adding into its own
    key rows), for all N queries and for the last L of them."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        compare(pattern, 1, 1, 701, 32, torch.float32, "auto", 1e-5)
        g = torch.Generator().manual_seed(3)
        q, k, v, do = (torch.randn(1, 1, 701, 32, generator=g) for _ in range(4))
        do[:, :, :401] = 0  # the full computation's gradients then equal those of the last 300 queries
        got = run(q[:, :, 401:], k, v, pattern, "auto", do[:, :, 401:])
        want = run(q.double(), k.double(), v.double(), pattern, "reference", do.double())
        for name, a, b in zip("o dq dk dv".split(), got, (want[0][:, :, 401:], want[1][:, :, 401:], *want[2:])):
            assert rel_err(a, b) <= 1e-5, (name, rel_err(a, b))
    finally:
        torch.set_num_threads(before)


@pytest.mark.slow
def test_long_sequence_against_reference():
    compare(P.Strided(64), 1, 2, 4000, 16, torch.float32, "auto", 1e-5)
    compare(P.Fixed(64, 8, distinct_heads=True), 1, 2, 4000, 16, torch.float32, "auto", 1e-5)


@pytest.mark.parametrize("pattern", every_pattern(7, 3), ids=repr)
def test_causal(pattern):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 60, 8, generator=g) for _ in range(3))
    base = sp.attention(q, k, v, pattern)
    for i in (0, 13, 41):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, i + 1 :] = torch.randn_like(k2[:, :, i + 1 :]) * 100
        v2[:, :, i + 1 :] = torch.randn_like(v2[:, :, i + 1 :]) * 100
        out = sp.attention(q, k2, v2, pattern)
        assert torch.equal(out[:, :, : i + 1], base[:, :, : i + 1])


@pytest.mark.parametrize("N", [1, 2, 129, 3001])
def test_finite_everywhere(N):
    for pattern in every_pattern(32, 8):
        q, k, v = (torch.randn(1, 2, N, 16, requires_grad=True) for _ in range(3))
        o = sp.attention(q * 30, k * 30, v, pattern)  # large logits
        o.sum().backward()
        for t in (o, q.grad, k.grad, v.grad):
            assert torch.isfinite(t).all(), pattern


def test_rows_without_keys_are_zero():
    # FixedSummary(8, 2): queries 0..5 come before the first summary column.
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    o = sp.attention(q, k, v, P.FixedSummary(8, 2))
    assert torch.equal(o[0, 0, :6], torch.zeros(6, 8))
    assert o[0, 0, 6:].abs().sum() > 0


def test_scale():
    q, k, v = (torch.randn(1, 2, 50, 8, dtype=torch.float64) for _ in range(3))
    a = sp.attention(q, k, v, P.Strided(7), scale=0.3)
    b = sp.attention(q, k, v, P.Strided(7), scale=0.3, backend="reference")
    assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), True, "1"])
def test_scale_must_be_finite_and_positive(scale):
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        sp.attention(q, q, q, P.Strided(4), scale=scale)


@pytest.mark.parametrize("backend", ["auto", "cpu", "native", "reference"])
@pytest.mark.parametrize("which", ["k", "v"])
@pytest.mark.parametrize("pattern,N", [(P.Strided(8), 32), (P.Strided(8), 1024), (P.Strided(22), 500),
                                       (P.Fixed(22, 4), 2048)])
def test_non_finite_input_is_never_hidden_and_stays_near(backend, which, pattern, N):
    """What the docstring promises: every query that attends a NaN key or value is non-finite; on the
    native kernel and the decomposition the NaN reaches no query 64 or more positions away."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, N, 16, generator=g) for _ in range(3))
    (k if which == "k" else v)[0, :, 10] = float("nan")
    bad = ~torch.isfinite(sp.attention(q, k, v, pattern, backend=backend)).all(-1)  # (1, H, N)
    sees = pattern.mask(N)[:, 10]
    assert bad[0, :, sees].all(), "a query that attends the NaN must not hide it"
    if backend != "reference":
        far = (torch.arange(N) - 10).abs() >= 64
        assert not bad[0, :, far & ~sees].any()


def test_non_contiguous_inputs():
    x = torch.randn(2, 50, 3, 8, dtype=torch.float64)  # (B, N, H, D) as a model makes it
    q = k = v = x.transpose(1, 2)
    a = sp.attention(q, k, v, P.Fixed(8, 2))
    b = sp.attention(q, k, v, P.Fixed(8, 2), backend="reference")
    assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize(
    "args,match",
    [
        ((torch.randn(2, 8, 4),) * 3, "must be 4-D"),
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 8, 4)), "k, v \\[B, H, N, D\\] with L <= N"),
        ((torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4).double(), torch.randn(1, 2, 8, 4)), "same dtype"),
        ((torch.randint(0, 3, (1, 2, 8, 4)),) * 3, "dtype must be one of"),
    ],
)
def test_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        sp.attention(*args, P.Strided(4))


def test_bad_pattern_list_and_backend():
    q = torch.randn(1, 3, 8, 4)
    with pytest.raises(ValueError, match="one pattern per head: got 2 for H=3"):
        sp.attention(q, q, q, [P.Dense(), P.Dense()])
    with pytest.raises(ValueError, match="must be a Pattern"):
        sp.attention(q, q, q, "strided")
    with pytest.raises(ValueError, match="unknown backend"):
        sp.attention(q, q, q, P.Dense(), backend="fast")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        sp.attention(q, q, q, P.Dense(), backend="cuda")


_CUDA_CASES = [(p, torch.bfloat16, 2e-2) for p in (P.Strided(32), P.Fixed(32, 8), P.Fixed(32, 8, True), P.Dense(),
                                                    P.Local(20), P.FixedSummary(32, 8))]
_CUDA_CASES += [(P.Strided(32), torch.float32, 1e-4), (P.Strided(32), torch.float16, 2e-2)]  # each compiles (~10 s)


@pytest.mark.gpu
@pytest.mark.parametrize("pattern,dtype,tol", _CUDA_CASES, ids=lambda x: repr(x) if isinstance(x, P.Pattern) else str(x))
def test_cuda_matches_reference(pattern, dtype, tol):
    """Backend auto on CUDA (FlexAttention), heads in groups, against the float64 reference."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 1000, 64, generator=g) for _ in range(4))
    want = run(q.double(), k.double(), v.double(), pattern, "reference", do.double())
    got = run(*(t.cuda().to(dtype) for t in (q, k, v)), pattern, "auto", do.cuda().to(dtype))
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) <= tol


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", [P.Strided(32), P.Fixed(32, 8), P.Local(20)], ids=repr)
def test_cuda_decomposition_matches_reference(pattern):
    """backend="cuda": the fused-SDPA decomposition on CUDA, what auto falls back to if FlexAttention fails."""
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(2, 4, 1000, 64, generator=g) for _ in range(4))
    want = run(q.double(), k.double(), v.double(), pattern, "reference", do.double())
    got = run(*(t.cuda().to(torch.bfloat16) for t in (q, k, v)), pattern, "cuda", do.cuda().to(torch.bfloat16))
    for a, b in zip(got, want):
        assert rel_err(a.cpu(), b) <= 2e-2


def test_auto_uses_the_native_kernel_on_cpu(monkeypatch):
    from sparse_transformer.attention import api as core

    calls = []
    real = core.tiles_attention
    monkeypatch.setattr(core, "tiles_attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 2, 40, 16)
    for p in (P.Strided(8), P.Fixed(8, 2), P.DilatedWindow(4, 2)):
        sp.attention(q, q, q, p)
        assert calls, f"float32 {p} on the CPU should run on the native kernel"
        calls.clear()
    sp.attention(q, q, q, P.Strided(8), backend="cpu")
    sp.attention(q, q, q, P.Dense())
    sp.attention(q.double(), q.double(), q.double(), P.Fixed(8, 2))
    assert not calls


def test_native_build_failure_warns_and_falls_back(monkeypatch, tmp_path):
    from sparse_transformer.attention.native import build

    monkeypatch.setattr(build, "_libs", {})
    monkeypatch.setattr(build, "_warned", set())
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SPARSE_TRANSFORMER_CACHE", str(tmp_path / "cache"))
    q = torch.randn(1, 2, 40, 16, dtype=torch.float64).float()
    with pytest.warns(RuntimeWarning, match="could not be built.*slower fused-SDPA"):
        a = sp.attention(q, q, q, P.Strided(8))
    b = sp.attention(q, q, q, P.Strided(8), backend="reference")
    assert rel_err(a, b) < 1e-5
    with pytest.raises(ValueError, match="could not be built"):
        sp.attention(q, q, q, P.Strided(8), backend="native")


def test_native_kernel_compiles_into_one_graph():
    # The kernel is a torch.library custom op: torch.compile(fullgraph=True) traces through it.
    f = lambda q, k, v: sp.attention(q, k, v, P.Strided(8))  # noqa: E731
    q, k, v = (torch.randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    want = f(q, k, v)
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    got = torch.compile(f, fullgraph=True)(q, k, v)
    got_grads = torch.autograd.grad(got.sum(), (q, k, v))
    assert torch.allclose(got, want, atol=1e-6)
    for a, b in zip(got_grads, want_grads):
        assert torch.allclose(a, b, atol=1e-6)


def test_cpu_decomposition_computes_half_precision_sparse_patterns_in_float32():
    """On the CPU, auto runs the decomposition of sparse patterns in float32 for bfloat16 input (it is faster
    there); the result is the float32 result rounded once, and gradients come back in bfloat16."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    for pattern in (P.Fixed(8, 2), [P.FixedBlock(8)] + [P.FixedSummary(8, 2)]):
        out = sp.attention(q, k, v, pattern)
        exact = sp.attention(q.detach().float(), k.detach().float(), v.detach().float(), pattern).to(torch.bfloat16)
        assert out.dtype == torch.bfloat16 and torch.equal(out, exact)
        out.sum().backward()
        assert q.grad.dtype == torch.bfloat16 and torch.isfinite(q.grad).all()
    dense = sp.attention(q, k, v, P.Dense())  # one fused SDPA call, kept in bfloat16
    assert dense.dtype == torch.bfloat16


def test_auto_without_the_native_kernel_runs_short_sequences_as_one_masked_sdpa_call(monkeypatch):
    from sparse_transformer.attention import api as core

    monkeypatch.setenv("SPARSE_TRANSFORMER_NATIVE", "0")
    calls = []
    real = core.masked_sdpa
    monkeypatch.setattr(core, "masked_sdpa", lambda *a: calls.append(a[0].shape[2]) or real(*a))
    for n in (40, core.MASKED_SDPA_BELOW - 1, core.MASKED_SDPA_BELOW + 37):
        for pattern in (P.Fixed(16, 4), P.Fixed(16, 4, distinct_heads=True), [P.FixedBlock(8), P.FixedSummary(8, 2)]):
            compare(pattern, 1, 2, n, 16, torch.float32, "auto", 1e-5)
    assert set(calls) == {40, core.MASKED_SDPA_BELOW - 1}, "masked SDPA below the threshold, decomposition above"
    calls.clear()
    compare(P.Fixed(16, 4), 1, 2, 100, 16, torch.float32, "cpu", 1e-5)
    monkeypatch.setenv("SPARSE_TRANSFORMER_NATIVE", "1")
    compare(P.Fixed(16, 4), 1, 2, 100, 16, torch.float32, "auto", 1e-5)
    assert not calls, "the native kernel and explicit backends never take the masked path"


def test_explain_path_names_the_path():
    from sparse_transformer.attention.api import explain_path

    q = torch.randn(1, 2, 1024, 16)
    assert explain_path(q, P.Strided(32)).startswith("native kernel")
    assert explain_path(q, P.Fixed(16, 4)).startswith("native kernel")
    assert explain_path(q, P.Fixed(16, 4), backend="cpu").startswith("fused-SDPA decomposition")
    assert explain_path(q.double(), P.Strided(32)) == "fused-SDPA decomposition (float64)"
