import math

import pytest
import torch
import torch.nn.functional as F

from sparse_transformer import patterns as P
from sparse_transformer.model import ModelConfig, SparseTransformer
from sparse_transformer.train.config import build_config

from helpers import informative_model


def small(**kw) -> ModelConfig:
    base = dict(n_ctx=64, d_model=32, n_layer=2, n_head=4, stride=8, c=2)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize("preset,paper", [("enwik8", 95e6), ("cifar10", 59e6), ("imagenet64", 152e6)])
def test_paper_parameter_counts(preset, paper):
    cfg = build_config(preset, None, [])
    with torch.device("meta"):
        n = SparseTransformer(cfg.model).num_params()
    assert abs(n - paper) / paper < 0.03, n


def test_initialisation_section_6():
    cfg = small(n_layer=8, d_model=256, n_ctx=128)
    torch.manual_seed(0)
    m = SparseTransformer(cfg)
    fc = m.blocks[0].ff.fc.weight
    assert fc.std().item() == pytest.approx(math.sqrt(0.125 / 256), rel=0.05)
    proj = m.blocks[0].attn.proj.weight
    assert proj.std().item() == pytest.approx(math.sqrt(0.125 / 256) / math.sqrt(16), rel=0.05)
    w2 = m.blocks[0].ff.proj.weight
    assert w2.std().item() == pytest.approx(math.sqrt(0.125 / 1024) / math.sqrt(16), rel=0.05)
    assert torch.count_nonzero(m.head.weight) == 0 and torch.count_nonzero(m.head.bias) == 0
    assert all(torch.count_nonzero(mod.bias) == 0 for mod in m.modules() if isinstance(mod, torch.nn.Linear))
    assert m.tok.weight.std().item() == pytest.approx(0.125 / 16, rel=0.05)
    assert m.pos.tables[1].std().item() == pytest.approx(0.125 / 16 / math.sqrt(2), rel=0.1)
    x = torch.randint(0, 256, (2, 128))
    assert m(x, targets=x)[1].item() == pytest.approx(math.log(256), abs=1e-5)  # zero logits


def test_position_coordinates():
    m = SparseTransformer(small(data_shape=[4, 4, 3], n_ctx=48))
    assert m.pos.coords[:, 17].tolist() == [1, 1, 2]  # 17 = (1 * 4 + 1) * 3 + 2
    m = SparseTransformer(small(n_ctx=64, stride=8))
    assert [t.shape[0] for t in m.pos.tables] == [8, 8]
    assert m.pos.coords[:, 19].tolist() == [2, 3]


def test_combine_modes():
    cfg = small(pattern="strided", combine="interleaved")
    assert cfg.layer_patterns(0) == P.Local(8) and cfg.layer_patterns(1) == P.StridedColumns(8)
    cfg = small(pattern="fixed", combine="multihead", distinct_heads=True)
    assert cfg.layer_patterns(0) == [P.FixedBlock(8)] * 2 + [P.FixedSummary(8, 2, True)] * 2
    assert small(pattern="fixed").layer_patterns(3) == P.Fixed(8, 2)


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "fixed"])
@pytest.mark.parametrize("combine", ["merged", "interleaved", "multihead"])
def test_model_is_causal(pattern, combine):
    torch.manual_seed(0)
    m = SparseTransformer(small(pattern=pattern, combine=combine, n_ctx=50))
    torch.nn.init.normal_(m.head.weight)  # make logits depend on the input
    x = torch.randint(0, 256, (1, 50))
    base, _ = m(x)
    for t in (0, 9, 31):
        y = x.clone()
        y[:, t:] = torch.randint(0, 256, (1, 50 - t))
        assert torch.allclose(m(y)[0][:, : t + 1], base[:, : t + 1], atol=1e-6)


@pytest.mark.parametrize("rotary", [False, True])
def test_half_size_qk_matches_reference_attention(monkeypatch, rotary):
    torch.manual_seed(0)
    m = SparseTransformer(small(qk_ratio=0.5, ff_mult=2.0, rotary=rotary))
    torch.nn.init.normal_(m.head.weight)
    x = torch.randint(0, 256, (2, 64))
    fast, _ = m(x)
    import sparse_transformer.model.model as mm

    original = mm.attention
    ref = lambda q, k, v, p, scale=None: original(q, k, v, p, scale=scale, backend="reference")  # noqa: E731
    monkeypatch.setattr(mm, "attention", ref)
    assert torch.allclose(m(x)[0], fast, atol=1e-5)


def test_checkpoints_with_separate_q_k_v_still_load():
    """Weights saved when q, k and v were three layers load into the fused qkv layer."""
    torch.manual_seed(0)
    cfg = small(qk_ratio=0.5)
    m = SparseTransformer(cfg)
    torch.nn.init.normal_(m.head.weight)
    old = {}
    for name, t in m.state_dict().items():
        if ".qkv." not in name:
            old[name] = t
            continue
        prefix, kind = name.split(".qkv.")
        for part, piece in zip("qkv", t.split([cfg.d_qk, cfg.d_qk, cfg.d_model])):
            old[f"{prefix}.{part}.{kind}"] = piece.clone()
    fresh = SparseTransformer(cfg)
    fresh.load_state_dict(old)
    x = torch.randint(0, 256, (2, 64))
    assert torch.equal(fresh(x)[0], m(x)[0])


def test_recompute_same_loss_and_grads_with_dropout():
    cfg = small(dropout=0.3)
    torch.manual_seed(0)
    m = SparseTransformer(cfg)
    x = torch.randint(0, 256, (2, 64))
    grads = []
    for recompute in (False, True):
        m.cfg.recompute = recompute
        m.zero_grad()
        torch.manual_seed(5)
        _, loss = m(x, targets=x)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == grads[1][0]
    for a, b in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(a, b, atol=1e-6)


def test_bad_config():
    with pytest.raises(ValueError, match="model.pattern must be one of"):
        SparseTransformer(small(pattern="sparse"))
    with pytest.raises(ValueError, match="multiple of model.n_head"):
        SparseTransformer(small(d_model=30))
    with pytest.raises(ValueError, match="exceeds model.n_ctx"):
        SparseTransformer(small())(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("pattern", ["dense", "local", "strided", "fixed"])
@pytest.mark.parametrize("combine", ["merged", "interleaved", "multihead"])
@pytest.mark.parametrize("recompute", [False, True])
def test_incremental_decoding_matches_full_forward(pattern, combine, recompute):
    torch.manual_seed(0)
    cfg = small(pattern=pattern, combine=combine, n_ctx=45, stride=6, c=2, distinct_heads=pattern == "fixed",
                qk_ratio=0.5, recompute=recompute)
    m = SparseTransformer(cfg).eval()
    torch.nn.init.normal_(m.head.weight)
    x = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        full, _ = m(x)
    cache = m.new_cache(2)
    for t in range(45):
        logits = m.step(None if t == 0 else x[:, t - 1], t, cache)
        assert torch.allclose(logits, full[:, t], atol=1e-4, rtol=1e-4), (t, (logits - full[:, t]).abs().max())


@pytest.mark.parametrize("pattern,combine", [("dense", "merged"), ("strided", "multihead"), ("fixed", "interleaved")])
def test_rotary_model_is_causal_and_decodes_like_the_full_forward(pattern, combine):
    torch.manual_seed(0)
    cfg = small(pattern=pattern, combine=combine, n_ctx=45, stride=6, c=2, qk_ratio=0.5, rotary=True)
    m = SparseTransformer(cfg).eval()
    torch.nn.init.normal_(m.head.weight)
    x = torch.randint(0, 256, (2, 45))
    with torch.no_grad():
        full, _ = m(x)
        cfg.rotary = False
        plain = SparseTransformer(cfg).eval()
        plain.load_state_dict(m.state_dict())
        assert not torch.allclose(plain(x)[0], full, atol=1e-3)  # the rotation is applied
        y = x.clone()
        y[:, 20:] = torch.randint(0, 256, (2, 25))
        assert torch.allclose(m(y)[0][:, :21], full[:, :21], atol=1e-6)
    cache = m.new_cache(2)
    for t in range(45):
        logits = m.step(None if t == 0 else x[:, t - 1], t, cache)
        assert torch.allclose(logits, full[:, t], atol=1e-4, rtol=1e-4), (t, (logits - full[:, t]).abs().max())


def test_rotary_scores_depend_on_the_offset_only():
    from sparse_transformer.model.model import rotate

    torch.manual_seed(0)
    q, k = torch.randn(1, 8, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64)

    def score(i, j):
        return (rotate(q, torch.tensor([i])) * rotate(k, torch.tensor([j]))).sum().item()

    assert score(5, 2) == pytest.approx(score(3, 0), abs=1e-5)
    assert score(1_000_003, 1_000_000) == pytest.approx(score(3, 0), abs=1e-4)
    assert score(3, 0) != pytest.approx(score(4, 0), abs=1e-3)
    assert torch.equal(rotate(q, torch.tensor([0])).float(), q.float())  # position 0 is not rotated
    with pytest.raises(ValueError, match="model.rotary needs an even query/key width"):
        SparseTransformer(small(d_model=12, n_head=4, rotary=True))


def test_generate_cached_equals_naive_and_is_seeded():
    from sparse_transformer.model.generate import generate, generate_naive

    torch.manual_seed(0)
    m = SparseTransformer(small(pattern="fixed", n_ctx=40, stride=8, c=2))
    torch.nn.init.normal_(m.head.weight, std=0.5)
    a = generate(m, 2, 30, temperature=0, prompt=b"ab")
    b = generate_naive(m, 2, 30, temperature=0, prompt=b"ab")
    assert torch.equal(a, b) and a[0, :2].tolist() == [97, 98]
    s1 = generate(m, 3, 20, temperature=1.0, seed=7)
    s2 = generate(m, 3, 20, temperature=1.0, seed=7)
    assert torch.equal(s1, s2) and not torch.equal(s1, generate(m, 3, 20, temperature=1.0, seed=8))
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(m, 1, 5, temperature=-1)
    with pytest.raises(ValueError, match="exceeds model.n_ctx"):
        generate(m, 1, 41)
    with pytest.raises(ValueError, match="exceeds model.n_ctx"):
        generate(m, 1, 1, prompt=bytes(40))
    # a prompt may be a tensor of tokens (an image's first pixels, mu-law audio): the same as its bytes
    c = generate(m, 2, 30, temperature=0, prompt=torch.tensor([97, 98]))
    assert torch.equal(a, c)
    for bad, msg in [(torch.tensor([1.5]), "1-D integer tensor"), (torch.tensor([[1]]), "1-D integer tensor"),
                     (torch.tensor([256]), r"must be in \[0, 255\]")]:
        with pytest.raises(ValueError, match=msg):
            generate(m, 1, 2, prompt=bad)


def test_fixed_cache_is_a_fraction_of_dense():
    def cache_bytes(pattern):
        m = SparseTransformer(ModelConfig(n_ctx=16384, d_model=64, n_layer=1, n_head=4, pattern=pattern, stride=128, c=16))
        return m.cache_bytes(m.new_cache(1))

    ratio = cache_bytes("fixed") / cache_bytes("dense")
    assert ratio == pytest.approx((128 * 16 + 128) / 16384)  # summaries of 128 blocks + one block
    assert ratio <= 0.25
    # a local cache keeps its window; a strided one every position once in its column, plus the window
    assert cache_bytes("local") / cache_bytes("dense") == pytest.approx(128 / 16384)
    assert cache_bytes("strided") / cache_bytes("dense") == pytest.approx((16384 + 128) / 16384)


def test_prefix_caches_read_only_what_the_position_sees():
    """With ``length`` = t + 1 the fixed cache's static read is the prefix of summaries and the current
    block up to t, and the dense pattern's cache reads positions 0..t: not the whole store."""
    from sparse_transformer.attention.kv_cache import DenseCache, FixedCache

    def first_cache(pattern):
        m = SparseTransformer(ModelConfig(n_ctx=4096, d_model=64, n_layer=1, n_head=4, pattern=pattern, stride=128, c=16))
        (_, cache), = m.new_cache(1)[0]
        return cache

    fixed, dense = first_cache("fixed"), first_cache("dense")
    assert isinstance(fixed, FixedCache) and isinstance(dense, DenseCache)
    for t in (1, 127, 128, 1000, 4095):
        k, v, valid = fixed.read_at(torch.tensor(t), t + 1)  # valid None: every key read
        assert k.shape[2] == v.shape[2] == (t // 128) * 16 + t % 128 + 1 and valid is None
        k, _, valid = dense.read_at(torch.tensor(t), t + 1)
        assert k.shape[2] == t + 1 and valid is None
    assert fixed.read_at(torch.tensor(1000))[0].shape[2] == 32 * 16 + 128  # without length: the whole store


@pytest.mark.parametrize("pattern,combine,extra", [
    ("strided", "merged", {}), ("fixed", "interleaved", {}), ("fixed", "multihead", {"distinct_heads": True}),
    ("local", "merged", {"rotary": True}), ("dense", "merged", {"qk_ratio": 0.5}), ("fixed:8:2:true", "multihead", {}),
])
def test_prefill_then_decode_equals_the_full_forward(pattern, combine, extra):
    """generate's prefill: one sparse forward over the prompt fills every cache; the decode steps after it
    give the full forward's logits (1e-4), for prompts that end inside, at and after a block boundary."""
    m = informative_model(n_ctx=48, d_model=32, n_layer=2, n_head=4, stride=8, c=2, pattern=pattern, combine=combine,
                          **extra)
    with torch.no_grad():
        x = torch.randint(0, 256, (2, 48))
        full, _ = m(x)
        for plen in (1, 7, 8, 9, 30):
            cache = m.new_cache(2)
            m(x[:, :plen], cache=cache)
            for t in range(plen, plen + 6):
                got = m.step(x[:, t - 1], t, cache)
                assert torch.allclose(got, full[:, t], atol=1e-4), (plen, t, (got - full[:, t]).abs().max())


def test_new_cache_takes_dense_by_keyword_only():
    """new_cache(1, 16384), a length where ``dense`` would be, is an error, not a silent dense cache."""
    m = SparseTransformer(ModelConfig(n_ctx=64, d_model=32, n_layer=1, n_head=2, pattern="fixed", stride=8, c=2))
    with pytest.raises(TypeError):
        m.new_cache(1, 16384)
    with pytest.raises(ValueError, match="batch"):
        m.new_cache(0)
    assert m.cache_bytes(m.new_cache(1)) < m.cache_bytes(m.new_cache(1, dense=True))


@pytest.mark.parametrize("pattern,combine", [("strided", "merged"), ("local", "multihead"), ("fixed", "interleaved"),
                                             ("dense", "merged"), ("strided_columns:8", "merged")])
def test_native_decoding_step_reads_the_cache_in_place(monkeypatch, pattern, combine):
    """An eager step with head width 16 runs the native decoding kernel (decode.c) over the cache's own
    views (Strided: the ring and the column, not joined), and gives the full forward's logits (1e-4),
    batch 2, across ring wrap-arounds and block boundaries; the dense-cache baseline stays on SDPA."""
    from sparse_transformer.attention import kv_cache, native

    if not native.available(16):
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    calls, kernel = [], native.decode_attention

    def counted(q, parts, scale):
        calls.append(len(parts))
        return kernel(q, parts, scale)

    monkeypatch.setattr(kv_cache.native, "decode_attention", counted)
    m = informative_model(n_ctx=40, d_model=64, n_layer=2, n_head=4, stride=8, c=2, pattern=pattern, combine=combine)
    with torch.no_grad():
        x = torch.randint(0, 256, (2, 40))
        full, _ = m(x)
        cache = m.new_cache(2)
        for t in range(40):
            got = m.step(None if t == 0 else x[:, t - 1], t, cache)
            assert torch.allclose(got, full[:, t], atol=1e-4), (t, (got - full[:, t]).abs().max())
    assert calls and (pattern != "strided" or max(calls) == 2)  # strided: two segments read in place
    calls.clear()
    with torch.no_grad():
        baseline = m.new_cache(2, dense=True)
        for t in range(3):
            m.step(None if t == 0 else x[:, t - 1], t, baseline)
    assert not calls  # the baseline is SDPA over every cached position


def test_native_decoding_kernel_against_sdpa_on_strided_views():
    """decode_attention on views with head strides of a column store, an empty segment, and B, h > 1,
    against scaled_dot_product_attention over the joined keys."""
    from sparse_transformer.attention import native

    if not native.available(32):
        pytest.skip("the native kernel cannot be built here (no C compiler)")
    torch.manual_seed(0)
    ck, cv = torch.randn(3, 5, 7, 11, 32), torch.randn(3, 5, 7, 11, 32)  # [B, h, l, M, D]
    rk, rv = torch.randn(3, 5, 9, 32), torch.randn(3, 5, 9, 32)
    q = torch.randn(3, 5, 32)
    parts = [(rk, rv), (ck[:, :, 4, :6], cv[:, :, 4, :6]), (ck[:, :, 2, :0], cv[:, :, 2, :0])]
    assert native.decode_fits(q, parts)
    got = native.decode_attention(q, parts, 0.2)
    k, v = torch.cat([a for a, _ in parts], 2), torch.cat([b for _, b in parts], 2)
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, scale=0.2)[:, :, 0]
    assert torch.allclose(got, want, atol=1e-5)
    assert not native.decode_fits(q.double(), parts) and not native.decode_fits(q[..., :24], parts)


def test_decoding_linear_uses_a_fresh_transposed_weight():
    from sparse_transformer.model.model import Linear

    torch.manual_seed(0)
    layer = Linear(16, 48)
    for rows in (1, 3, 8, 9):
        x = torch.randn(rows, 1, 16)
        with torch.no_grad():
            assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-6)
    assert hasattr(layer, "_wt")  # the few-row product took the transposed copy
    with torch.no_grad():
        layer.weight.add_(1.0)  # changed in place: the copy must be made again
        x = torch.randn(1, 16)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)
    x.requires_grad_(True)
    layer(x).sum().backward()  # with gradients: plain nn.Linear
    assert layer.weight.grad is not None
