"""Model configuration (paper sections 5.1-5.3)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .. import patterns as P

PATTERNS = ("dense", "local", "strided", "fixed")
COMBINES = ("merged", "interleaved", "multihead")
ACTIVATIONS = ("gelu", "gelu_sigmoid")


@dataclass
class ModelConfig:
    """A Sparse Transformer over 256 byte values.

    data_shape: the shape of one example in raster order, e.g. [32, 32, 3] for
    CIFAR-10; it drives the factorized position embeddings (one table per
    dimension). Empty for text and audio: then the positions are the (row,
    column) of a matrix whose width is the stride.

    rotary: also rotate queries and keys by their position (RoPE, Su et al.
    2021), so that q.k sees the relative offset from the first step. Not in
    the paper; with long contexts and few sequences per step it lets a small
    model learn to look at the last few bytes far sooner (BENCHMARKS.md, "the
    text plateau").
    """

    n_ctx: int = 1024
    d_model: int = 256
    n_layer: int = 4
    n_head: int = 4
    ff_mult: float = 4.0  # 2.0 for the paper's "half-size" feed-forward
    qk_ratio: float = 1.0  # 0.5 for "half-size" queries and keys
    pattern: str = "strided"
    stride: int = 32
    c: int = 8  # summary width of the fixed pattern
    distinct_heads: bool = False
    combine: str = "merged"
    dropout: float = 0.0
    activation: str = "gelu"
    data_shape: list[int] = field(default_factory=list)
    recompute: bool = False
    rotary: bool = False  # rotary embedding of queries and keys on top of the paper's (not in the paper)
    vocab_size: int = 256

    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        for name in ("n_ctx", "d_model", "n_layer", "n_head", "stride", "c", "vocab_size"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"model.{name} must be an integer >= 1, got {v!r}")
        need(isinstance(self.pattern, str), f"model.pattern must be a string, got {self.pattern!r}")
        if self.pattern not in PATTERNS:  # a spec such as "fixed:128:16", or a registered name
            try:
                P.parse(self.pattern)
            except ValueError as e:
                raise ValueError(f"model.pattern must be one of {', '.join(PATTERNS)} (with model.stride, model.c) "
                                 f"or a spec: {e}") from None
        need(self.combine in COMBINES, f"model.combine must be one of {', '.join(COMBINES)}, got {self.combine!r}")
        need(self.activation in ACTIVATIONS, f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        need(self.d_model % self.n_head == 0, f"model.d_model ({self.d_model}) must be a multiple of model.n_head ({self.n_head})")
        need(0 < self.ff_mult <= 64, f"model.ff_mult must be a number in (0, 64], got {self.ff_mult}")
        need(0 < self.qk_ratio <= 1, f"model.qk_ratio must be in (0, 1], got {self.qk_ratio}")
        qk = self.d_model * self.qk_ratio
        need(qk == int(qk) and int(qk) % self.n_head == 0, f"model.d_model * model.qk_ratio ({qk}) must be a multiple of model.n_head ({self.n_head})")
        need(not self.rotary or (int(qk) // self.n_head) % 2 == 0,
             f"model.rotary needs an even query/key width per head, got {int(qk) // self.n_head}")
        need(0 <= self.dropout < 1, f"model.dropout must be in [0, 1), got {self.dropout}")
        need(self.c <= self.stride, f"model.c must be in [1, model.stride={self.stride}], got {self.c}")
        if self.data_shape:
            size = 1
            for d in self.data_shape:
                need(isinstance(d, int) and d >= 1, f"model.data_shape must be positive integers, got {self.data_shape}")
                size *= d
            need(size >= self.n_ctx, f"model.data_shape {self.data_shape} holds {size} positions, fewer than model.n_ctx={self.n_ctx}")

    @property
    def d_qk(self) -> int:
        return int(self.d_model * self.qk_ratio)

    @property
    def d_ff(self) -> int:
        return int(round(self.d_model * self.ff_mult))

    def position_shape(self) -> list[int]:
        """The dimensions of the factorized position embedding (section 5.3)."""
        if self.data_shape:
            return list(self.data_shape)
        return [-(-self.n_ctx // self.stride), self.stride]

    def full_pattern(self) -> P.Pattern:
        """The pattern of the model: a spec (``patterns.parse``), or a name with model.stride and model.c."""
        if self.pattern not in PATTERNS:
            return P.parse(self.pattern)
        if self.pattern == "dense":
            return P.Dense()
        if self.pattern == "local":
            return P.Local(self.stride)
        if self.pattern == "strided":
            return P.Strided(self.stride)
        return P.Fixed(self.stride, self.c, self.distinct_heads)

    def layer_patterns(self, layer: int) -> P.Pattern | list[P.Pattern]:
        """The attention pattern(s) of residual block ``layer`` (section 5.1).

        merged: every head attends the whole pattern; interleaved: block r uses
        factor r mod p; multihead: heads are split evenly among the p factors.
        """
        full = self.full_pattern()
        factors = full.factors()
        if self.combine == "merged" or len(factors) == 1:
            return full
        if self.combine == "interleaved":
            return factors[layer % len(factors)]
        return [factors[h * len(factors) // self.n_head] for h in range(self.n_head)]
