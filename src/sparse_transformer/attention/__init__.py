"""Sparse attention: ``attention(q, k, v, pattern)``.

  api.py        checks, the choice of path, dtype policy, dispatch
  heads.py      one pattern per head; heads that share a pattern run together
  native/       the fused CPU kernel: kernel.c and its parts, its build, its PyTorch operators
  plan.py       the decomposition's sub-problems (the CUDA and float64 path)
  merge.py      merging sub-problems through their log-sum-exps, as an autograd function
  sdpa.py       the fused SDPA kernels the decomposition calls, and masked SDPA
  kv_cache.py   KV caches for decoding that follow the pattern
  reference.py  dense masked softmax: the test oracle
"""
from .api import BACKENDS, attention
from .heads import per_head_patterns
from .reference import reference_attention

__all__ = ["attention", "reference_attention", "per_head_patterns", "BACKENDS"]
