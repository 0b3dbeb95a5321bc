"""The fused CPU kernel (section 5.5): ``kernel.c`` (and the parts it includes), its build (``build.py``) and its operators (``ops.py``)."""
from .build import available, cache_dir, describe, enabled, load, padded_dim, target, warn_once
from .ops import decode_attention, decode_fits, query_tile, tiles_attention

__all__ = ["available", "cache_dir", "describe", "enabled", "load", "padded_dim", "target", "warn_once",
           "query_tile", "tiles_attention", "decode_attention", "decode_fits"]
