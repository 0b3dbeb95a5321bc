"""The Sparse Transformer (paper sections 5.2, 5.3 and 6), readable top to bottom.

    h_0 = embed(start token, x shifted right) + factorized position embeddings
    (optionally, queries and keys rotated by position: ``rotary``, not in the paper)
    h_k = h_{k-1} + a + b,   a = dropout(attn(norm(h_{k-1}))),
                             b = dropout(ff(norm(h_{k-1} + a)))
    logits = norm(h_N) W_out
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..attention import attention
from ..attention.heads import head_groups
from ..attention.kv_cache import DenseCache, LayerCache, ModelCache, make_cache, static_step_attention, step_attention
from ..patterns.base import check_int
from .config import ModelConfig


class PositionEmbedding(nn.Module):
    """One learned table per data dimension, summed (section 5.3).

    Position p is unravelled into coordinates of ``shape`` (row-major): for
    images (row, column, channel); for text and audio (p // stride, p % stride).
    """

    def __init__(self, shape: list[int], n_ctx: int, d_model: int):
        super().__init__()
        self.tables = nn.ParameterList([nn.Parameter(torch.zeros(n, d_model)) for n in shape])
        coords = []
        p = torch.arange(n_ctx)
        for n in reversed(shape):
            coords.append(p % n)
            p = p // n
        self.register_buffer("coords", torch.stack(coords[::-1]), persistent=False)  # (len(shape), n_ctx)

    def forward(self, n: int) -> torch.Tensor:
        # F.embedding, not table[idx]: the backward of an advanced-index gather
        # (index_put_ with accumulate) sums repeated rows in a thread-dependent
        # order on the CPU, and training would not be reproducible.
        out = 0
        for table, idx in zip(self.tables, self.coords[:, :n]):
            out = out + F.embedding(idx, table)
        return out  # (n, d_model)

    def at(self, t: int | torch.Tensor) -> torch.Tensor:
        """The embedding of position t alone (an int, or a 0-d tensor for a compiled step): (d_model,)."""
        if torch.is_tensor(t):
            coords = self.coords.index_select(1, t.view(1))[:, 0]
            return sum(table.index_select(0, coords[i].view(1))[0] for i, table in enumerate(self.tables))
        out = 0
        for table, idx in zip(self.tables, self.coords[:, t]):
            out = out + table[idx]  # one row: a select, nothing accumulates
        return out


def rotate(x: torch.Tensor, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding: x (..., T, D) rotated by positions ``pos`` (T,).

    Channel pairs (i, i + D/2) turn by pos * base^(-2i/D), so that
    rotate(q, i) . rotate(k, j) depends on i - j only. Angles are formed in
    float64 (positions reach 10^6) and the rotation is done in float32.
    """
    D = x.shape[-1]
    inv = base ** (-torch.arange(0, D // 2, device=x.device, dtype=torch.float64) / (D // 2))
    ang = pos.to(torch.float64)[:, None] * inv  # (T, D/2)
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state dict) with a faster product for the few rows of a decoding step.

    For one to eight rows, MKL's matrix-vector product reads a weight stored (out, in) at about half the
    bandwidth of the same weight stored (in, out) when out > in (the q, k, v and first feed-forward weights:
    about 10 against 19-24 GB/s on an AMD EPYC Zen 4, BENCHMARKS.md). Without gradients, on the CPU in
    float32, such a layer keeps a transposed copy of its weight, made again whenever the weight changes, and
    multiplies by it. A compiled step reads the copy as it was when ``refresh_transposed`` last ran (the compiled
    decoding step calls it). Everything else is ``nn.Linear``."""

    _wt: torch.Tensor | None = None  # the (in, out) copy, made for a float32 weight on the CPU when out > in
    _wt_key: tuple[int, int] | None = None  # the weight's (data_ptr, _version) when the copy was made

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wt = self._transposed(x)
        if wt is None:
            return super().forward(x)
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), wt) if self.bias is not None \
            else x.reshape(-1, self.in_features) @ wt
        return y.reshape(*x.shape[:-1], self.out_features)

    def _transposed(self, x: torch.Tensor) -> torch.Tensor | None:
        """The (in, out) copy of the weight when x is a decoding step's few rows, else None. Cheap checks
        first: a step calls this 16 times (8 layers)."""
        if self.out_features <= self.in_features or x.numel() > 8 * self.in_features or torch.is_grad_enabled() \
                or x.dtype is not torch.float32 or not x.is_cpu:
            return None
        if torch.compiler.is_compiling():
            # A compiled step reads the copy that ``refresh_transposed`` made before the call: a graph input,
            # refreshed in place, so a changed weight reaches the graph without a recompilation.
            return self._wt
        w = self.weight
        if self._wt_key != (w.data_ptr(), w._version):
            self.refresh_transposed()
        return self._wt

    def refresh_transposed(self) -> None:
        """Make the (in, out) copy of the weight again if the weight changed since the last one (only where
        ``forward`` uses it: out > in, a float32 weight on the CPU; elsewhere there is no copy)."""
        w = self.weight
        if self.out_features <= self.in_features or not w.is_cpu or w.dtype is not torch.float32:
            self._wt, self._wt_key = None, None
            return
        key = (w.data_ptr(), w._version)
        if self._wt_key == key:
            return
        if self._wt is not None and self._wt.shape == (self.in_features, self.out_features):
            with torch.no_grad():
                self._wt.copy_(w.t())
        else:
            self._wt = w.detach().t().contiguous()  # (in, out)
        self._wt_key = key


class Attention(nn.Module):
    """Multi-head sparse self-attention. Queries and keys may be narrower (qk_ratio)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.n_head, self.d_qk, self.d_v = cfg.n_head, cfg.d_qk, cfg.d_model
        self.rotary = cfg.rotary
        # q, k and v in one matrix product: [W_q; W_k; W_v], widths d_qk, d_qk, d_model.
        self.qkv = Linear(cfg.d_model, 2 * cfg.d_qk + cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.pattern = cfg.layer_patterns(layer)
        self._register_load_state_dict_pre_hook(_join_qkv)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (..., C) -> q, k (..., d_qk) and v (..., C)."""
        return self.qkv(x).split([self.d_qk, self.d_qk, self.d_v], dim=-1)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, C/H)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, C) at positions 0..T-1 -> q, k (B, H, T, d_qk/H), v (B, H, T, C/H)."""
        q, k, v = (self.split(t) for t in self.project(x))
        if self.rotary:
            pos = torch.arange(x.shape[1], device=x.device)
            q, k = rotate(q, pos), rotate(k, pos)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None,
                input_pos: int | torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
        """One forward for training, prefill and decoding: x (B, T, C) -> (B, T, C).

        - no ``cache``: positions 0..T-1 (training);
        - ``cache`` (from ``new_cache``), no ``input_pos``: positions 0..T-1, whose keys and values
          are also stored in the cache (prefill), so decoding continues at position T;
        - ``cache`` and ``input_pos`` t (T = 1): decode position t, reading only the keys the pattern
          allows from the cache after writing t's. With t a 0-d tensor every shape is static (the
          cache's ``read_at``: the most keys any position reads, masked), for a compiled step;
          ``length`` (t + 1, a Python int) lets prefix caches read only what t can see, a size
          that a step compiled with dynamic shapes keeps symbolic.
        """
        if input_pos is not None:
            return self._decode(x, input_pos, cache, length)
        B, T, C = x.shape
        q, k, v = self.heads(x)
        if cache is not None:
            for heads, group in cache.selections:
                group.fill(k[:, heads], v[:, heads])
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.d_qk != self.d_v:
            # The fused kernels need one head width; zero columns leave q.k unchanged.
            pad = (0, v.shape[-1] - q.shape[-1])
            q, k = F.pad(q, pad), F.pad(k, pad)
        y = attention(q, k, v, self.pattern, scale=scale)  # (B, H, T, C/H)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.proj(y)

    def new_cache(self, B: int, n_ctx: int, like: torch.Tensor, dense: bool = False) -> LayerCache:
        """One pattern-following KV cache per group of heads that share a key set (``dense``: one cache
        of every position that each step reads whole, the baseline of ``bench sample``)."""
        H = self.n_head
        if dense:  # the baseline: SDPA over every cached position, as bench sample defines it
            baseline = DenseCache(self.pattern, B, H, n_ctx, self.d_qk // H, self.d_v // H, like)
            baseline.native_step = False
            return LayerCache([(torch.arange(H), baseline)])
        return LayerCache([
            (heads, make_cache(p, B, len(heads), n_ctx, self.d_qk // H, self.d_v // H, like))
            for heads, p in head_groups(self.pattern, H)
        ])

    def _decode(self, x: torch.Tensor, t: int | torch.Tensor, cache: LayerCache, length: int | None) -> torch.Tensor:
        """Position t: x (B, 1, C) -> (B, 1, C). q.k is computed in float32 (section 5.6: it overflows
        float16)."""
        B, _, C = x.shape
        H = self.n_head
        static = torch.is_tensor(t)
        q, k_new, v_new = (y.reshape(B, H, -1) for y in self.project(x[:, 0]))  # (B, H, D)
        if self.rotary:
            pos = t.view(1) if static else torch.tensor([t], device=x.device)
            q, k_new = rotate(q[:, :, None], pos)[:, :, 0], rotate(k_new[:, :, None], pos)[:, :, 0]
        scale = 1.0 / math.sqrt(q.shape[-1])
        out = None if cache.whole else x.new_zeros(B, H, C // H)
        for heads, group in cache.selections:  # heads: a slice for one group of every head
            if static:
                group.write_at(t, k_new[:, heads], v_new[:, heads])
                k, v, valid = group.read_at(t, length)  # (B, h, K, D), (K,) or None: all valid
                o = static_step_attention(q[:, heads].float(), k, v, valid, scale, group.native_step)  # (B, h, D)
            else:
                group.write(t, k_new[:, heads], v_new[:, heads])
                parts, mask = group.parts(t)  # [(B, h, K_i, D)] views of the cache, None or (sum K_i,)
                o = step_attention(q[:, heads].float(), parts, mask, scale, group.native_step)  # (B, h, D)
                if o is None:  # no allowed key: zero output, as in attention()
                    o = torch.zeros_like(v_new[:, heads])
            if out is None:
                out = o.to(x.dtype)
            else:
                out[:, heads] = o.to(out.dtype)
        return F.linear(out.reshape(B, 1, C), self.proj.weight, self.proj.bias)


def _join_qkv(state: dict, prefix: str, *args) -> None:
    """Load checkpoints written before q, k and v shared one matrix (separate q, k, v layers)."""
    for kind in ("weight", "bias"):
        parts = [prefix + f"{name}.{kind}" for name in ("q", "k", "v")]
        if all(p in state for p in parts):
            state[prefix + f"qkv.{kind}"] = torch.cat([state.pop(p) for p in parts])


def gelu_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """The paper's GELU approximation x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


class FeedForward(nn.Module):
    """ff(x) = W2 f(W1 x + b1) + b2, width ff_mult * d (section 5.2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.fc = Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.act = F.gelu if cfg.activation == "gelu" else gelu_sigmoid

    def forward(self, x):
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-activation residual block: h + a(h) + b(h) (section 5.2)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.attn = Attention(cfg, layer)
        self.ln2 = nn.LayerNorm(cfg.d_model, eps=1e-5)
        self.ff = FeedForward(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, h: torch.Tensor, cache: LayerCache | None = None,
                input_pos: int | torch.Tensor | None = None, length: int | None = None) -> torch.Tensor:
        """h (B, T, C); ``cache``, ``input_pos`` and ``length`` as in ``Attention.forward`` (training,
        prefill, decoding)."""
        a = self.drop(self.attn(self.ln1(h), cache, input_pos, length))
        b = self.drop(self.ff(self.ln2(h + a)))
        return h + a + b

    def decode(self, h: torch.Tensor, cache: LayerCache, t: int | torch.Tensor, length: int | None) -> torch.Tensor:
        """``forward`` at decoding position t, without dropout, its layers called as functions rather than as
        modules: a module call costs a few microseconds of Python, about ten of them a layer, which was 5-10% of
        an eager decoding step of 8 layers (BENCHMARKS.md). Hooks on the block's parts do not run here."""
        ff = self.ff
        a = self.attn._decode(_layer_norm(self.ln1, h), t, cache, length)
        x = _layer_norm(self.ln2, h + a)
        b = F.linear(ff.act(ff.fc.forward(x)), ff.proj.weight, ff.proj.bias)
        return h + a + b


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, ln.normalized_shape, ln.weight, ln.bias, ln.eps)


def nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Negative log-likelihood in nats, computed in float32: the one loss of training, evaluation and the
    benchmarks. reduction "mean" (a scalar), "sum", or "none" ((B, T), one value per position)."""
    flat = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
    return flat.view(targets.shape) if reduction == "none" else flat


class SparseTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.start = nn.Parameter(torch.zeros(d))
        self.pos = PositionEmbedding(cfg.position_shape(), cfg.n_ctx, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg, r) for r in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(d, eps=1e-6)
        self.head = nn.Linear(d, cfg.vocab_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialisation of section 6."""
        cfg = self.cfg
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=math.sqrt(0.125 / m.in_features))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:  # residual outputs scaled by 1/sqrt(2N)
            blk.attn.proj.weight.mul_(1 / math.sqrt(2 * cfg.n_layer))
            blk.ff.proj.weight.mul_(1 / math.sqrt(2 * cfg.n_layer))
        emb_std = 0.125 / math.sqrt(cfg.d_model)
        nn.init.normal_(self.tok.weight, std=emb_std)
        nn.init.normal_(self.start, std=emb_std)
        for t in self.pos.tables:
            nn.init.normal_(t, std=emb_std / math.sqrt(len(self.pos.tables)))
        nn.init.zeros_(self.head.weight)  # logits start at zero
        nn.init.zeros_(self.head.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T) bytes -> (B, T, d): the start token, then x shifted right, plus positions."""
        B, T = x.shape
        if T > self.cfg.n_ctx:
            raise ValueError(f"sequence length {T} exceeds model.n_ctx={self.cfg.n_ctx}")
        h = torch.cat([self.start.expand(B, 1, -1), self.tok(x[:, :-1])], dim=1)
        return self.drop(h + self.pos(T))

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                cache: ModelCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T) int64 in [0, vocab) -> (logits (B, T, vocab), loss); logits[:, t] predicts x[:, t].

        The model predicts its own input (the start token stands before x[:, 0]), so ``targets`` is
        normally ``x``. The loss is ``nll(logits, targets, reduction)``, None without targets.
        With ``cache`` (``new_cache``) the pass is a prefill: the sparse forward over positions 0..T-1
        also fills every layer's cache, and ``step(x[:, T-1], T, cache)`` continues from there.
        """
        h = self.embed(x)
        for i, blk in enumerate(self.blocks):
            if self.cfg.recompute and self.training and torch.is_grad_enabled() and cache is None:
                # Recompute attention and feed-forward in the backward (section 5.4);
                # the RNG state is restored so dropout masks match.
                h = checkpoint(blk, h, use_reentrant=False, preserve_rng_state=True)
            else:
                h = blk(h, None if cache is None else cache[i])
        logits = self.head(self.ln_f(h))  # (B, T, vocab)
        return logits, (None if targets is None else nll(logits, targets, reduction))

    def attention_path(self, device: torch.device, precision: str = "float32") -> str:
        """Which attention path each distinct layer pattern runs on at n_ctx (for the train header)."""
        from ..attention.api import explain_path

        dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(precision, torch.float32)
        head_dim = self.cfg.d_model // self.cfg.n_head
        q = torch.empty(1, self.cfg.n_head, self.cfg.n_ctx, head_dim, device=device, dtype=dtype)
        lines = {explain_path(q, blk.attn.pattern) for blk in self.blocks}
        return "; ".join(sorted(lines))

    def new_cache(self, batch: int, *, dense: bool = False) -> ModelCache:
        """KV caches for every block that follow each block's pattern (see attention/kv_cache.py), for
        ``n_ctx`` positions; ``dense``: caches of every position read whole at each step (a baseline,
        not this model's attention). ``dense`` is keyword-only: ``new_cache(1, 16384)`` read as a
        length would silently give the dense baseline."""
        check_int("batch", batch, 1)
        like = next(self.parameters())
        return ModelCache([blk.attn.new_cache(batch, self.cfg.n_ctx, like, dense) for blk in self.blocks], batch)

    @staticmethod
    def cache_bytes(cache: ModelCache) -> int:
        return cache.nbytes()

    @torch.no_grad()
    def step(self, prev: torch.Tensor | None, t: int, cache: ModelCache) -> torch.Tensor:
        """Logits (B, vocab) for position t given the byte at t-1 (``prev``, (B,); None at t=0).

        Equal to ``forward(x)[:, t]`` when fed x[t-1] at every t (tested).
        """
        if t >= self.cfg.n_ctx:
            raise ValueError(f"position {t} is beyond model.n_ctx={self.cfg.n_ctx}")
        h = self.start.expand(cache.batch, -1) if t == 0 else self.tok(prev)
        return self._decode(h, t, cache)

    @torch.no_grad()
    def decode(self, prev: torch.Tensor, t: torch.Tensor, cache: ModelCache, length: int | None = None) -> torch.Tensor:
        """``step`` for a position t >= 1 given as a 0-d int64 tensor: every shape is static, so
        ``torch.compile(model.decode, fullgraph=True)`` captures one graph for every position
        (``generate(..., compile=True)``). With ``length`` = t + 1 (a Python int), the fixed and
        dense caches read only the prefix that t can see; compiled with automatic dynamic shapes
        that is one symbolic size, one graph for every position after the first. The caller checks
        1 <= t < n_ctx."""
        return self._decode(self.tok(prev), t, cache, length)

    def _decode(self, h: torch.Tensor, t: int | torch.Tensor, cache: ModelCache, length: int | None = None) -> torch.Tensor:
        """The input embedding h (B, C) of position t -> logits (B, vocab), through the blocks' forward."""
        h = (h + self.pos.at(t))[:, None]  # (B, 1, C)
        fast = not self.training or self.cfg.dropout == 0  # Block.decode has no dropout
        for blk, c in zip(self.blocks, cache):
            h = blk.decode(h, c, t, length) if fast else blk(h, c, t, length)
        return F.linear(_layer_norm(self.ln_f, h), self.head.weight, self.head.bias)[:, 0]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
