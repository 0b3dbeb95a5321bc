"""The kernel as PyTorch operators: descriptions by key, custom ops with autograd, ``tiles_attention``."""
from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from .build import _built, _check, _ptr


@torch.compiler.assume_constant_result
def query_tile(head_dim: int = 64) -> int:
    """The kernel's tile of queries (64 with AVX-512, 32 with AVX2, 16 otherwise): descriptions are built for it."""
    return _built(head_dim).st_query_tile()


# Descriptions by key: the custom operators take a string (an operator cannot take a pattern), the
# pattern's spec (patterns/registry.py) with the length and tile, so that torch.compile treats
# the description as a constant and the kernel as one opaque node. A pattern class that is not
# registered is kept by object here (eager mode only: torch.compile needs a registered pattern).
_OBJECTS: dict[str, object] = {}


def _pattern_token(pattern) -> str:
    from ...patterns.registry import has_spec, spec

    if has_spec(pattern):
        return spec(pattern)
    token = f"object#{id(pattern)}"
    _OBJECTS[token] = pattern
    return token


@torch.compiler.assume_constant_result
def _description_key(token: str, n: int, tile: int) -> str:
    from ...patterns.tiles import describe

    cols = describe(_pattern(token), n, tile).columns
    N = n + (-n % cols[0] if cols else 0)  # the column layout wants a multiple of its stride
    return f"{token}|{N}|{tile}"


def _pattern(token: str):
    from ...patterns.registry import _INSTANCES

    if token.startswith("object#"):
        return _OBJECTS[token]
    if token in _INSTANCES:  # a named instance (Custom): the one registered now under that name
        return _INSTANCES[token]
    return _parse(token)


@functools.lru_cache(maxsize=256)  # every forward and backward resolves its key: parse each spec once
def _parse(spec: str):
    from ...patterns.registry import parse

    return parse(spec)


def _tiles(key: str):
    from ...patterns.tiles import describe

    token, N, tile = key.rsplit("|", 2)
    return describe(_pattern(token), int(N), int(tile))


def _desc(key: str) -> list:
    t = _tiles(key)
    l, strict, window = t.columns or (0, False, 0)
    return [t.ntiles, max(1, t.max_keys), t.gather.numel(), *map(_ptr, (t.ptr, t.iv, t.gather, t.masks)), l,
            int(strict), window]


# The kernel as two custom operators with a registered autograd formula, so that
# torch.compile sees them as opaque nodes instead of breaking its graph at ctypes.
@torch.library.custom_op("sparse_transformer::tiles_fwd", mutates_args=())
def tiles_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, q0: int,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (BH, N - q0, D): positions q0..N-1 (q0 a multiple of the tile), k, v (BH, N, D), contiguous
    float32, and a description's key -> o (BH, N - q0, D), lse (BH, N - q0)."""
    lib = _built(q.shape[-1])
    o = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32)
    _check(lib.st_tiles_forward(q.shape[0], k.shape[1], *_desc(key), q0, scale, torch.get_num_threads(),
                                *map(_ptr, (q, k, v, o, lse))))
    return o, lse


@tiles_fwd.register_fake
def _(q, k, v, key, q0, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:2])


@torch.library.custom_op("sparse_transformer::tiles_bwd", mutates_args=())
def tiles_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, do: torch.Tensor, lse: torch.Tensor,
    key: str, q0: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    lib = _built(q.shape[-1])
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)  # the kernel sets every row
    _check(lib.st_tiles_backward(q.shape[0], k.shape[1], *_desc(key), q0, scale, torch.get_num_threads(),
                                 *map(_ptr, (q, k, v, o, do, lse, dq, dk, dv))))
    return dq, dk, dv


@tiles_bwd.register_fake
def _(q, k, v, o, do, lse, key, q0, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _tiles_setup(ctx, inputs, output) -> None:
    q, k, v, key, q0, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.args = (key, q0, scale)


def _tiles_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = tiles_bwd(q, k, v, o, do.contiguous(), lse, *ctx.args)
    return dq, dk, dv, None, None, None


tiles_fwd.register_autograd(_tiles_backward, setup_context=_tiles_setup)


def tiles_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern, scale: float) -> torch.Tensor:
    """Any pattern on the kernel, from its description; q [B, H, L, D] (the last L positions),
    k, v [B, H, n, D], float32 on the CPU, D a kernel width (``padded_dim``), the kernel loaded;
    returns [B, H, L, D]."""
    B, H, L, D = q.shape
    n, T = k.shape[2], query_tile(D)
    key = _description_key(_pattern_token(pattern), n, T)
    N = int(key.split("|")[-2])  # n, padded for the column layout
    q0 = (n - L) // T * T  # the kernel's queries start at a tile: zero queries before n - L
    front = n - L - q0
    if front or N > n:
        q = F.pad(q, (0, 0, front, N - n))
    if N > n:
        k, v = (F.pad(t, (0, 0, 0, N - n)) for t in (k, v))
    q = q.reshape(B * H, N - q0, D).contiguous()
    k, v = (t.reshape(B * H, N, D).contiguous() for t in (k, v))
    o, _ = tiles_fwd(q, k, v, key, q0, scale)
    return o.view(B, H, N - q0, D)[:, :, front : front + L]


def decode_attention(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]], scale: float) -> torch.Tensor:
    """One decoding step (``decode.c``): q (B, h, D) float32 against the keys and values of ``parts``,
    each (B, h, L, D) with contiguous rows (a view of a cache's store; nothing is copied); -> (B, h, D).
    The caller checks ``decode_fits``. A compiled step calls it as a custom operator; an eager one calls the
    kernel directly (the operator's dispatch costs about 5 us more a call)."""
    keys, values = [k for k, _ in parts], [v for _, v in parts]
    if torch.compiler.is_compiling():
        return decode_op(q, keys, values, scale)
    return _decode(q, keys, values, scale)


def _decode(q: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], scale: float) -> torch.Tensor:
    B, h, D = q.shape
    lib = _built(D)
    q = q.contiguous()
    out = torch.empty_like(q)
    seg = []  # {keys, values, batch stride, head stride, rows} of each non-empty segment
    for k, v in zip(keys, values):
        if k.shape[2]:
            seg += (k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.shape[2])
    seg_array = (ctypes.c_int64 * max(5, len(seg)))(*seg)  # a ctypes array: 2 us less than a tensor
    _check(lib.st_decode(B, h, len(seg) // 5, ctypes.cast(seg_array, ctypes.c_void_p), _ptr(q), scale, _ptr(out),
                         torch.get_num_threads()))
    return out


# The decoding step as an operator defined through torch.library.Library, not custom_op: a compiled step
# calls it at each layer, and custom_op's Python wrapper cost 10 us more a call (25 against 15 us).
_LIBRARY = torch.library.Library("sparse_transformer", "FRAGMENT")
_LIBRARY.define("decode(Tensor q, Tensor[] keys, Tensor[] values, float scale) -> Tensor")
_LIBRARY.impl("decode", _decode, "CPU")


@torch.library.register_fake("sparse_transformer::decode")
def _(q, keys, values, scale):
    return q.new_empty(q.shape)


decode_op = torch.ops.sparse_transformer.decode


def decode_fits(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether ``decode_attention`` can read these tensors where they lie: float32 on the CPU, no
    gradient, rows of D contiguous floats, keys and values laid out alike."""
    D = q.shape[-1]
    if q.device.type != "cpu" or q.dtype != torch.float32 or q.requires_grad or D % 16:
        return False
    return all(k.dtype == v.dtype == torch.float32 and k.stride() == v.stride() and k.shape == v.shape
               and k.shape[-1] == D and k.stride(3) == 1 and k.stride(2) == D and not (k.requires_grad or v.requires_grad)
               for k, v in parts)
