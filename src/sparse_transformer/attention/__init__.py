"""Sparse attention: the attention function, its kernels and decomposition."""
from .core import BACKENDS, attention, per_head_patterns
from .reference import reference_attention

__all__ = ["attention", "reference_attention", "per_head_patterns", "BACKENDS"]
