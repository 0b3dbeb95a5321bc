"""FlexAttention with block masks built from the pattern's description (paper section 5.5).

Each layout of a pattern's description (``patterns/tiles.py``) becomes one ``flex_attention`` call:

- the tiles (layout 0): the description is built with FlexAttention's query block as its tile;
  each tile's key intervals give the key blocks it reads. A block is *full* when every query of
  the tile attends every key in it, *partial* when some do (FlexAttention applies the mask_mod
  there only), and absent otherwise;
- the columns (layout 1, strided's second factor): the sequence viewed as [N/l, l] and transposed
  to [l, N/l], where every column is a causal run of N/l positions, so its blocks are local.

The two calls' outputs are merged through their log-sum-exps with differentiable torch ops.
The block lists are built directly (``BlockMask`` from kv and q lists, including the transposed
ones the backward reads), in O(N / block) work and memory for the paper's patterns: no
``create_block_mask``, and nothing of size (N / block)^2.

FlexAttention runs its fused Triton kernels, forward and backward, on CUDA; on the CPU its
compiled forward runs (no backward), which is what the tests check there.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch

from ..patterns import Pattern
from ..patterns.tiles import BAND, FULL, MASK, Tiles, describe

BLOCK = 128  # FlexAttention's default block, and the smallest its CUDA kernels took for D=64 on an H200


# ------------------------------------------------------------------ block lists
def _expand(first: torch.Tensor, count: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entry x stands for the values first[x] .. first[x] + count[x] - 1: (entry, value) of each."""
    idx = torch.repeat_interleave(count)
    start = torch.cumsum(count, 0) - count
    return idx, (first - start).index_select(0, idx) + torch.arange(len(idx), device=idx.device)


def _overlaps(tile: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, any_lo: torch.Tensor, any_hi: torch.Tensor,
              all_lo: torch.Tensor, all_hi: torch.Tensor, block: int, device=None):
    """For key ranges [lo, hi) of tiles (empty ones skipped), one entry per key block they touch:
    (tile, key block, keys some query of the tile attends there (> 0 or not), keys every query attends
    there), on ``device`` (default: the inputs'), where the work of expanding the ranges is done."""
    tile, lo, hi, any_lo, any_hi, all_lo, all_hi = (x.to(device) for x in
                                                    (tile, lo, hi, any_lo, any_hi, all_lo, all_hi))
    b0 = lo // block
    idx, kb = _expand(b0, torch.where(hi > lo, (hi - 1) // block + 1 - b0, 0))
    k0 = kb * block

    def keys(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:  # of [lo, hi), in each entry's block
        end = (hi.index_select(0, idx) - k0).clamp(max=block)
        return (end - (lo.index_select(0, idx) - k0).clamp(min=0)).clamp(min=0)

    some, every = keys(any_lo, any_hi), keys(all_lo, all_hi)
    return tile.index_select(0, idx), kb, some, every


def _tile_entries(t: Tiles, block: int, gathered: bool, device=None):
    """(tile, key block, any keys, all keys) for every interval of a description built with
    tile == block: view-0 FULL and BAND intervals as ranges, MASK intervals key by key, and the
    gathered keys (view 1) key by key at their positions, unless ``gathered`` (their own layout).
    The intervals are read on the CPU; the entries are made on ``device``."""
    T, n = t.tile, t.n
    tile_of = t.tile_of
    view, s, e, kind, arg = (t.iv[:, c].long() for c in range(5))
    r0 = tile_of * T
    r1 = torch.clamp(r0 + T, max=n)
    big = torch.full_like(s, 2 * n + 2 * T)
    win = torch.where(arg > 0, arg, big)  # BAND 0: every earlier key
    band = kind == BAND
    # BAND w: some query of [r0, r1) attends k iff r0 - w < k <= r1 - 1; all do iff r1 - w <= k <= r0
    any_lo = torch.where(band, r0 - win + 1, s)
    any_hi = torch.where(band, r1, e)
    all_lo = torch.where(band, r1 - win, torch.where(kind == FULL, s, e))
    all_hi = torch.where(band, r0 + 1, torch.where(kind == FULL, e, s))
    rng = (view == 0) & (kind != MASK)
    ranges = _overlaps(tile_of, s, torch.where(rng, e, s), torch.maximum(any_lo, s), torch.minimum(any_hi, e),
                       torch.maximum(all_lo, s), torch.minimum(all_hi, e), block, device)  # the others: empty
    # key by key: gathered keys (view 1) and the MASK intervals' columns
    singles = (kind == MASK) & (view == 0) if gathered else ~rng | (kind == MASK)
    parts = [ranges]
    for x in torch.nonzero(singles).flatten().tolist():
        keys = torch.arange(int(s[x]), int(e[x]))
        pos = keys if view[x] == 0 else t.gather[keys].long()
        rows = int(r1[x] - r0[x])
        if kind[x] == MASK:
            m = t.masks[int(arg[x]) : int(arg[x]) + rows * len(keys)].view(rows, len(keys)).bool()
            some, every = m.any(0), m.all(0)
        elif kind[x] == FULL:
            some = every = torch.ones(len(keys), dtype=torch.bool)
        else:
            q = torch.arange(int(r0[x]), int(r1[x]))[:, None]
            ok = pos[None, :] <= q
            if arg[x] > 0:
                ok &= q - pos[None, :] < int(arg[x])
            some, every = ok.any(0), ok.all(0)
        parts.append(tuple(c.to(device) for c in (torch.full_like(pos, int(tile_of[x])), pos // block, some.long(),
                                                   every.long())))
    return [torch.cat(c) for c in zip(*parts)]


def _column_entries(n: int, l: int, strict: bool, window: int, block: int, device=None):
    """The columns layout in transposed coordinates p = c * (n / l) + m: query p attends the earlier
    positions of its own run of M = n / l (strictly earlier when ``strict``), the nearest ``window``."""
    M, s = n // l, int(strict)
    w = window if window else 2 * n
    qb = torch.arange(-(-n // block))
    r0, r1 = qb * block, torch.clamp(qb * block + block, max=n)
    first, last = r0 // M, (r1 - 1) // M  # the runs a query block touches
    idx, run = _expand(first, last - first + 1)
    S = run * M
    a, b = torch.maximum(r0[idx], S + s), torch.minimum(r1[idx], S + M)  # rows of this run with a key
    if w <= s:  # window 1 and strict: no key at all
        a = b
    lo, hi = torch.maximum(S, a - w + 1), b - s  # keys some row attends: [lo, hi)
    whole = (a == r0[idx]) & (b == r1[idx])  # one run covers the block, every row with keys
    all_lo = torch.where(whole, torch.maximum(S, b - w), hi)
    all_hi = torch.where(whole, a - s + 1, lo)
    return _overlaps(qb[idx], lo, hi, lo, hi, all_lo, torch.maximum(all_hi, all_lo), block, device)


def _lists(qb: torch.Tensor, kb: torch.Tensor, nq: int, width: int):
    """Entries (query block, key block), unique, as FlexAttention's (num [1, 1, nq], indices [1, 1, nq, width]);
    its kernels read only the first num of each row."""
    if len(qb) > 1 and not bool((qb[1:] >= qb[:-1]).all()):  # entries come in (row, column) order or by column
        order = torch.sort(qb.to(torch.int32), stable=True).indices  # int32 keys: a faster sort
        qb, kb = qb.index_select(0, order), kb.index_select(0, order)
    num = torch.bincount(qb, minlength=nq)
    slot = torch.arange(len(qb), device=qb.device) - torch.repeat_interleave(torch.cumsum(num, 0) - num, num)
    idx = torch.zeros(nq * width, dtype=torch.int32, device=qb.device)
    idx.index_copy_(0, qb * width + slot, kb.to(torch.int32))
    return num.to(torch.int32)[None, None], idx.view(1, 1, nq, width)


def _width(rows: tuple[torch.Tensor, ...], n_rows: int) -> int:
    """The most entries of a row over the partial and the full lists: both lists get this width.
    FlexAttention's decoding kernel (torch 2.13) indexes the full list with the partial list's offsets,
    and create_block_mask always gives both the same width. On an H200 with torch 2.11 (2026-12-04),
    Fixed's summary layout came out wrong with widths 1 and 7 (or 3) and right with 1 and 1."""
    return max([1] + [int(torch.bincount(r, minlength=n_rows).max()) for r in rows if len(r)])


def _block_mask(entries, n: int, block: int, mask_mod, device, n_kv: int | None = None,
                full_width: bool | None = None):
    """A BlockMask from (query block, key block, any, all) entries (several per pair are summed);
    n queries, n_kv keys (default n). Its lists are as wide as the most blocks of a row, or hold every
    block with ``full_width`` (default: on the CPU, whose compiled FlexAttention asks for that)."""
    from torch.nn.attention.flex_attention import BlockMask

    qb, kb, some, every = entries
    n_kv = n if n_kv is None else n_kv
    nb, nkb = -(-n // block), -(-n_kv // block)
    key = qb * nkb + kb
    if len(key) > 1 and not bool((key[1:] > key[:-1]).all()):  # a pair met twice, or out of order: sum them
        uniq, inv = torch.unique(key, return_inverse=True)
        some = torch.zeros(len(uniq), dtype=torch.long, device=key.device).index_add_(0, inv, some)
        every = torch.zeros(len(uniq), dtype=torch.long, device=key.device).index_add_(0, inv, every)
        qb, kb = uniq // nkb, uniq % nkb
    width = torch.clamp(n_kv - kb * block, max=block)  # keys in the block
    full = every == width
    part = (some > 0) & ~full
    wide = torch.device(device).type == "cpu" if full_width is None else full_width
    qk = torch.stack([qb, kb])
    (qp, kp), (qf, kf) = (qk.index_select(1, torch.nonzero(m).flatten()) for m in (part, full))
    w_kv = nkb if wide else _width((qp, qf), nb)
    w_q = nb if wide else _width((kp, kf), nkb)
    kv = _lists(qp, kp, nb, w_kv) + _lists(qf, kf, nb, w_kv)
    q = _lists(kp, qp, nkb, w_q) + _lists(kf, qf, nkb, w_q)
    kv, q = [t.to(device) for t in kv], [t.to(device) for t in q]
    return BlockMask(seq_lengths=(n, n_kv), kv_num_blocks=kv[0], kv_indices=kv[1], full_kv_num_blocks=kv[2],
                     full_kv_indices=kv[3], q_num_blocks=q[0], q_indices=q[1], full_q_num_blocks=q[2],
                     full_q_indices=q[3], BLOCK_SIZE=(block, block), mask_mod=mask_mod)


def _tile_mask_mod(pattern: Pattern, n: int, t: Tiles, gathered, device):
    """The tiles layout's predicate: the pattern minus its columns part and, when the gathered keys
    have their own layout, minus the pairs that layout computes."""
    allowed = pattern.mask_mod(n, device)
    l, strict, window = t.columns or (0, False, 0)
    if gathered is not None:
        lo, hi = gathered[1].to(device), gathered[2].to(device)
        where = torch.full((n,), -1, dtype=torch.long)
        where[t.gather.long()] = torch.arange(t.gather.numel())  # position -> index in the gathered view
        where = where.to(device)
    T = t.tile

    def mod(b, h, i, j):
        ok = allowed(i, j) & (j <= i)
        if l:
            d = i - j
            ok = ok & ~((d >= (l if strict else 0)) & (d % l == 0) & ((d // l < window) if window else True))
        if gathered is not None:
            g = where[j]
            ok = ok & ~((g >= lo[i // T]) & (g < hi[i // T]))
        return ok

    return mod


def _column_mask_mod(n: int, l: int, strict: bool, window: int):
    M = n // l

    def mod(b, h, i, j):
        ok = (i // M == j // M) & (j <= i - int(strict))
        return ok & (i - j < window) if window else ok

    return mod


def _gathered(t: Tiles, block: int, device=None):
    """The gathered keys (view 1: the fixed pattern's summary columns) as a layout of their own, when
    every tile reads at most one FULL interval of them: (entries on ``device``, lo, hi per tile), else None."""
    view, s, e, kind = (t.iv[:, c].long() for c in range(4))
    g = view == 1
    if not g.any():
        return None
    tile_of = t.tile_of[g]
    if (kind[g] != FULL).any() or len(torch.unique(tile_of)) < len(tile_of):
        return None
    lo, hi = torch.zeros(t.ntiles, dtype=torch.long), torch.zeros(t.ntiles, dtype=torch.long)
    lo[tile_of], hi[tile_of] = s[g], e[g]
    return _overlaps(tile_of, s[g], e[g], s[g], e[g], s[g], e[g], block, device), lo, hi


@dataclass(frozen=True, eq=False)
class Layouts:
    """A pattern's FlexAttention calls over n positions: each a BlockMask or None."""

    tiles: object  # queries against the sequence
    gathered: object  # queries against the gathered keys ``gather`` (padded to a whole block)
    gather: torch.Tensor | None
    columns: object  # the transposed [l, n / l] view, stride ``stride``
    stride: int

    @property
    def merged(self) -> bool:
        return sum(x is not None for x in (self.tiles, self.gathered, self.columns)) > 1


@functools.lru_cache(maxsize=64)
def block_masks(pattern: Pattern, n: int, block: int = BLOCK, device: str = "cpu",
                separate_gather: bool | None = None, full_width: bool | None = None) -> Layouts:
    """The layouts of ``pattern`` over n positions (n a multiple of ``block``, and of the column stride
    if any). ``separate_gather``: the gathered keys as their own call (default: off the CPU, whose
    compiled FlexAttention cannot merge calls); else they are read in place, in partial blocks.
    ``full_width``: block lists that hold every block (default: on the CPU only). The description is
    read on the CPU and the block lists are built on ``device``: there, the 2^20 positions' lists took
    18 ms (Strided(1024)) and 122 ms (Fixed(1024, 32)) when built on the H200's host and copied."""
    t = describe(pattern, n, block)
    sep = torch.device(device).type != "cpu" if separate_gather is None else separate_gather
    gathered = _gathered(t, block, device) if sep else None
    tiles = gath = cols = gpos = None
    if t.iv.numel() and (gathered is None or bool((t.iv[:, 0] == 0).any())):
        tiles = _block_mask(_tile_entries(t, block, gathered is not None, device), n, block,
                            _tile_mask_mod(pattern, n, t, gathered, device), device, full_width=full_width)
    if gathered is not None:
        entries, lo, hi = gathered
        ng = -(-t.gather.numel() // block) * block
        lo_d, hi_d = lo.to(device), hi.to(device)
        gath = _block_mask(entries, n, block, lambda b, h, i, j: (j >= lo_d[i // block]) & (j < hi_d[i // block]),
                           device, n_kv=ng, full_width=full_width)
        gpos = t.gather.long().to(device)
    if t.columns:
        l, strict, window = t.columns
        cols = _block_mask(_column_entries(n, l, strict, window, block, device), n, block,
                           _column_mask_mod(n, l, strict, window), device, full_width=full_width)
    return Layouts(tiles, gath, gpos, cols, t.columns[0] if t.columns else 0)


# ------------------------------------------------------------------ attention
def _raise_recompile_limit() -> None:
    """Each pattern, layout and length is a graph of its own, and they all share one code object (of
    flex_attention, or of ``_layouts_attention``). Torch allows 8 graphs by default (``recompile_limit``),
    and two patterns at three lengths already pass that. Past it, torch runs the eager FlexAttention, which
    materializes the N x N scores. So the limit is raised to 64."""
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 64)
    cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 512)


@functools.cache
def compiled_flex():
    """``flex_attention`` compiled once (eager FlexAttention is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention

    _raise_recompile_limit()
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def compiled_layouts():
    """``_layouts_attention`` on the plain ``flex_attention``, compiled as one graph: the transposes, the
    calls and the merge. Eagerly, these cost about 0.8 ms per forward on an H200 (the first GPU run,
    BENCHMARKS.md), more than the sparse kernels at 16k."""
    from torch.nn.attention.flex_attention import flex_attention

    _raise_recompile_limit()
    return torch.compile(functools.partial(_layouts_attention, flex=flex_attention), dynamic=False)


def _call(flex, q, k, v, bm, scale, lse: bool):
    """(out, natural log-sum-exp or None): the log-sum-exp only when layouts are merged (the CPU's
    compiled FlexAttention computes none)."""
    if not lse:
        return flex(q, k, v, block_mask=bm, scale=scale), None
    from torch.nn.attention.flex_attention import AuxRequest

    out, aux = flex(q, k, v, block_mask=bm, scale=scale, return_aux=AuxRequest(lse=True))
    return out, aux.lse


def merges(pattern: Pattern, device: str = "cpu") -> bool:
    """Whether the pattern's layouts on ``device`` are merged through log-sum-exps (strided: band and
    columns; off the CPU, fixed: its block and its gathered summary columns)."""
    return block_masks(pattern, 4 * padded_length(pattern, BLOCK), BLOCK, device).merged


def padded_length(pattern: Pattern, n: int, block: int = BLOCK) -> int:
    """n rounded up to a multiple of the block (and of the column stride, for a columns layout)."""
    cols = describe(pattern, block, block).columns
    step = math.lcm(block, cols[0]) if cols else block
    return -(-n // step) * step


def _layouts_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles, gathered, gather, columns,
                       stride: int, scale: float, *, flex) -> torch.Tensor:
    """One ``flex`` call per layout (``Layouts``' fields), merged through the log-sum-exps:
    q, k, v (B, H, N, D)."""
    B, H, N, D = q.shape
    merge = sum(x is not None for x in (tiles, gathered, columns)) > 1
    parts = []
    if tiles is not None:
        parts.append(_call(flex, q, k, v, tiles, scale, merge))
    if gathered is not None:
        pad = gathered.seq_lengths[1] - gather.numel()
        kg, vg = (torch.nn.functional.pad(x[:, :, gather], (0, 0, 0, pad)) for x in (k, v))
        parts.append(_call(flex, q, kg, vg, gathered, scale, merge))
    if columns is not None:
        l, M = stride, N // stride
        # (B, H, M, l, D) -> (B, H, l, M, D): each column becomes a contiguous run (section 5.5)
        qt, kt, vt = (x.view(B, H, M, l, D).transpose(2, 3).reshape(B, H, N, D) for x in (q, k, v))
        o, lse = _call(flex, qt, kt, vt, columns, scale, merge)
        parts.append((o.view(B, H, l, M, D).transpose(2, 3).reshape(B, H, N, D),
                      lse.view(B, H, l, M).transpose(2, 3).reshape(B, H, N) if merge else None))
    if not merge:
        return parts[0][0]
    acc = torch.promote_types(q.dtype, torch.float32)
    lses = torch.stack([lse.to(acc) for _, lse in parts])  # (layouts, B, H, N)
    lse = torch.logsumexp(lses, 0)
    safe = torch.where(torch.isfinite(lse), lse, 0.0)  # no key in any layout: output 0
    w = torch.exp(lses - safe)[..., None]
    return sum(o.to(acc) * w[x] for x, (o, _) in enumerate(parts)).to(q.dtype)


def flex_attention_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, scale: float,
                          *, block: int = BLOCK, flex=None, separate_gather: bool | None = None) -> torch.Tensor:
    """``pattern`` on FlexAttention: q, k, v (B, H, N, D), N already padded (see ``padded_length``).
    There is one call per layout, merged through the log-sum-exps. By default the whole is one compiled
    graph. ``flex`` stands in for ``flex_attention`` and is then called eagerly: for tests, with the same
    signature and return values."""
    lay = block_masks(pattern, q.shape[2], block, str(q.device), separate_gather)
    run = compiled_layouts() if flex is None else functools.partial(_layouts_attention, flex=flex)
    return run(q, k, v, lay.tiles, lay.gathered, lay.gather, lay.columns, lay.stride, scale)


# ------------------------------------------------------------------ the backend
_FAILED: list[str] = []


@functools.cache
def available() -> bool:
    """Whether this torch has FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest, BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def failed() -> bool:
    """Whether FlexAttention failed once in this process on ``backend="auto"`` (which then stays off it)."""
    return bool(_FAILED)


def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pats: list[Pattern], scale: float,
        fallback: bool) -> torch.Tensor | None:
    """``attention``'s flex path: q [B, H, L, D] (the last L positions), k, v [B, H, N, D]; each group of
    heads that shares a pattern is one call per layout. With ``fallback``, a failure of FlexAttention
    (compiling it for this GPU, say) is said once and gives None: the caller takes the decomposition."""
    from .heads import by_head_groups

    L, N = q.shape[2], k.shape[2]

    def one(q, k, v, p: Pattern) -> torch.Tensor:
        n_p = padded_length(p, N)
        q = torch.nn.functional.pad(q, (0, 0, N - L, n_p - N))  # queries in front of the last L: zeros
        k, v = (torch.nn.functional.pad(t, (0, 0, 0, n_p - N)) for t in (k, v))
        return flex_attention_sparse(q, k, v, p, scale)[:, :, N - L : N]

    try:
        return by_head_groups(q, k, v, pats, one)
    except Exception as e:  # noqa: BLE001 - whatever stops FlexAttention here, the decomposition is exact
        if not fallback:
            raise
        _FAILED.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        warnings.warn(f"sparse_transformer: FlexAttention failed on {q.device} ({_FAILED[0][:200]}); "
                      "backend 'auto' runs the fused-SDPA decomposition from now on", RuntimeWarning, stacklevel=3)
        return None
