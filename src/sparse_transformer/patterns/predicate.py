"""Evaluating a predicate ``allowed(i, j)`` block by block, for the description of a pattern that
has no closed form (``tiles.from_allowed``; paper section 5.5 for the tiles it feeds).

Every causal pair (i, j) is evaluated once, as FlexAttention's ``create_block_mask`` does, in
chunks of ``ROWS`` queries x the keys up to the chunk's last query: the predicate, the causal condition and the count of
allowed pairs per (tile of queries, block of keys) in one function. A (tile, block) is empty
(count 0), full (every pair of the tile's queries with the block's keys up to the tile's end) or
cut. Only the cut blocks are evaluated again, for their exact masks.

Eagerly that costs about 0.8 ns per pair on a 2-core CPU (0.11 s at N = 16,384, 1.7 s at 65,536).
The chunk function can be compiled with ``torch.compile`` (fused, vectorised: about 0.2 ns per
pair): once per predicate and process, for every length (the key extent is the one symbolic size).
Compiling takes about 3 s, so it is used from ``COMPILE_FROM`` positions on, where eager evaluation
costs more than compiling and the compiled one together (65,536: 1.7 s eager, 3.1 s compiling
included), or when asked (``compile=True``), and only where PyTorch runs at AVX512 (``sysutil.compiler_trusted``).
Its first chunks are checked against eager evaluation; if the predicate cannot be compiled
(data-dependent Python, say) or disagrees, the evaluation runs eagerly and says so once.
"""
from __future__ import annotations

import types
import warnings

import torch

from ..sysutil import compiler_trusted

ROWS = 1024
EAGER_KEYS = 512  # 30-40% faster than 2048 for three predicates at 16k, at AVX512 and AVX2 (BENCHMARKS.md)
COMPILE_FROM = 131072


def _causal(allowed, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """``allowed(i, j) & (j <= i)``, broadcast to the full (i, j) shape (a predicate may ignore one)."""
    causal = j <= i
    return torch.as_tensor(allowed(i, j)).broadcast_to(causal.shape) & causal


def _chunk_counts(allowed, tile: int, block: int, rows: int):
    """``counts(r0, keys, k0=0)``: allowed causal pairs of queries r0..r0+rows-1 with keys
    k0..k0+keys-1 (queries past the sequence's end count as if it went on), per (tile, block),
    int32 [rows / tile, keys / block] (eagerly, keys are taken EAGER_KEYS at a time, which keeps the
    intermediates in cache). ``keys`` (a multiple of block) reaches the chunk's last query; compiled, it is the one symbolic size (tile, block and rows are
    constants of the closure), so the key index stays the loop index and a predicate's arithmetic on
    it is cheap."""

    def counts(r0: torch.Tensor, keys: int, k0: int = 0) -> torch.Tensor:
        i = r0 + torch.arange(rows)[:, None]
        j = k0 + torch.arange(keys)[None, :]
        ok = _causal(allowed, i, j)
        return ok.view(rows // tile, tile, keys // block, block).sum((1, 3), dtype=torch.int32)

    # A code object of its own: dynamo caches graphs per code object, up to a recompile limit (8),
    # so closures of one shared code would run out of it after a few predicates.
    return types.FunctionType(counts.__code__.replace(), counts.__globals__, "counts", counts.__defaults__,
                              counts.__closure__)


_compiled: dict = {}  # (allowed, tile, block, rows) -> the compiled chunk function, or None if it failed
_warned: set = set()


def _warn_once(allowed, why: str) -> None:
    if allowed not in _warned:
        _warned.add(allowed)
        warnings.warn(f"{why}; evaluating the pattern's allowed(i, j) eagerly, about 10x slower", stacklevel=5)


def _chunk_fn(allowed, n: int, tile: int, block: int, rows: int, compile: bool | None):
    """(the chunk function, compiled or not): compiled when asked, or from COMPILE_FROM positions, or
    when this predicate was compiled already, on a CPU where the compiler is trusted; else eager."""
    key = (allowed, tile, block, rows)
    eager = _chunk_counts(*key)
    try:
        hash(allowed)
    except TypeError:  # a predicate that cannot be a key: compiled each time, if at all
        key = (id(allowed), tile, block, rows)
    if compile is False or (compile is None and n < COMPILE_FROM and key not in _compiled):
        return eager, False
    if not compiler_trusted():
        if compile:
            _warn_once(allowed, f"compiled evaluation is not trusted at {torch.backends.cpu.get_cpu_capability()}")
        return eager, False
    if key not in _compiled:
        # dynamic=None: the first call is compiled static, the second (another ``keys``) with
        # ``keys`` symbolic and nothing else (dynamic=True would make tile, block and rows symbolic
        # too, and the generated loop 4x slower). Both happen here, checked against eager, so that
        # a failure falls back here.
        fn = torch.compile(eager, fullgraph=True)
        try:
            for r0, keys in ((0, block), (rows, 2 * block)):
                if not torch.equal(fn(torch.tensor(r0), keys), eager(torch.tensor(r0), keys)):
                    raise RuntimeError("the compiled evaluation disagrees with the eager one")
        except Exception as e:  # noqa: BLE001 - any failure to trace or compile the user's predicate
            fn = None
            _warn_once(allowed, f"could not compile it ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        _compiled[key] = fn
    return (_compiled[key], True) if _compiled[key] else (eager, False)


def block_status(allowed, n: int, tile: int, block: int, compile: bool | None = None) -> torch.Tensor:
    """int8 [ceil(n / tile), ceil(n / block)]: 0 where the tile of queries attends no key of the
    block, 1 where its every query attends every key of the block up to the tile's end, 2 where the
    block is cut."""
    T, nb = -(-n // tile), -(-n // block)
    rows = tile * max(1, ROWS // tile)
    fn, compiled = _chunk_fn(allowed, n, tile, block, rows, compile)
    step = nb if compiled else max(1, EAGER_KEYS // block)  # key blocks per call
    counts = torch.zeros(-(-n // rows) * (rows // tile), nb, dtype=torch.int32)
    starts = torch.arange(0, n, rows)
    for c, r0 in enumerate(range(0, n, rows)):
        kb = min(nb, -(-(r0 + rows) // block))  # key blocks up to the chunk's last query
        for b0 in range(0, kb, step):
            b1 = min(kb, b0 + step)
            counts[r0 // tile: (r0 + rows) // tile, b0:b1] = fn(starts[c], (b1 - b0) * block, b0 * block)
    counts = counts[:T]
    if n % tile:  # the last tile, without its rows past n
        i, j = torch.arange((T - 1) * tile, n)[:, None], torch.arange(nb * block)[None, :]
        ok = _causal(allowed, i, j)
        counts[-1] = ok.view(i.shape[0], nb, block).sum((0, 2), dtype=torch.int32)
    r1 = torch.clamp((torch.arange(T) + 1) * tile, max=n)  # each tile's end
    start = torch.arange(nb) * block
    width = (torch.minimum(start[None, :] + block, r1[:, None]) - start[None, :]).clamp(min=0)
    full = counts == (r1 - torch.arange(T) * tile)[:, None] * width
    return torch.where(counts == 0, 0, torch.where(full, 1, 2)).to(torch.int8)


def cut_masks(allowed, status: torch.Tensor, n: int, tile: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cut (status 2) blocks, in row-major order of ``status``: their masks, bool [K, tile, block]
    (queries past n and keys past each query attend nothing), from one evaluation of the predicate
    on all of them; and whether each is exactly causal (every key up to the query), bool [K]."""
    t, b = torch.nonzero(status == 2, as_tuple=True)
    i = (t * tile)[:, None, None] + torch.arange(tile)[None, :, None]  # (K, tile, 1)
    j = (b * block)[:, None, None] + torch.arange(block)[None, None, :]  # (K, 1, block)
    causal = (j <= i) & (i < n)
    ok = _causal(allowed, i, j) & (i < n)
    return ok, (ok == causal).flatten(1).all(1)
