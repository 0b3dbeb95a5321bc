"""Pictures: attention patterns (the paper's Figure 3), learned attention (Figure 2), training curves.

Patterns and attention maps are drawn pixel by pixel with numpy and written
with Pillow, so a pattern picture's pixels are exactly the pattern's mask.
Curves use matplotlib (the ``plot`` extra).
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import torch

from .patterns import Pattern
from .sysutil import atomic_write_bytes

ALLOWED = (31, 119, 180)  # blue: query i may attend key j
EMPTY = (255, 255, 255)
QUERY = (214, 39, 40)  # red: the query itself
GAP = 4  # pixels between panels


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue()


def pattern_rows(pattern: Pattern | list[Pattern], heads: int = 1, factors: bool = False) -> list[tuple[str, Pattern]]:
    """(label, pattern) for each row of the picture: the pattern per head, then its factors."""
    pats = pattern if isinstance(pattern, list) else pattern.per_head(heads)
    rows = [(f"head {h}" if len(pats) > 1 else "pattern", p) for h, p in enumerate(pats)]
    if factors:
        rows += [(f"factor {k}", f) for k, f in enumerate(pats[0].factors())]
    return rows


def pattern_image(pattern: Pattern | list[Pattern], n: int, *, heads: int = 1, factors: bool = False,
                  query: int | None = None, width: int | None = None, scale: int = 4) -> np.ndarray:
    """One row per head (and factor): the n x n connectivity matrix, then the positions query ``query``
    attends to laid out in rows of ``width`` (the paper's Figure 3). uint8 [rows, cols, 3].

    Matrix cell (i, j) is the ``scale`` x ``scale`` block at (GAP + i*scale, GAP + j*scale) of its row.
    """
    query = n - 1 if query is None else query
    if not 0 <= query < n:
        raise ValueError(f"query must be in [0, {n - 1}], got {query}")
    width = width or max(1, math.isqrt(n))
    grid_h = -(-n // width)
    rows = pattern_rows(pattern, heads, factors)
    panel_h = max(n, grid_h) * scale
    H = GAP + len(rows) * (panel_h + GAP)
    W = GAP + n * scale + GAP + width * scale + GAP
    img = np.full((H, W, 3), 230, dtype=np.uint8)
    for r, (_, p) in enumerate(rows):
        top = GAP + r * (panel_h + GAP)
        m = p.mask(n).numpy()  # (n, n) bool
        mat = np.where(m[..., None], np.array(ALLOWED, np.uint8), np.array(EMPTY, np.uint8))
        img[top : top + n * scale, GAP : GAP + n * scale] = mat.repeat(scale, 0).repeat(scale, 1)
        row = np.full((grid_h * width, 3), 200, dtype=np.uint8)  # positions past n stay grey
        row[:n] = np.where(m[query][:, None], np.array(ALLOWED, np.uint8), np.array(EMPTY, np.uint8))
        row[query] = QUERY
        left = GAP + n * scale + GAP
        img[top : top + grid_h * scale, left : left + width * scale] = (
            row.reshape(grid_h, width, 3).repeat(scale, 0).repeat(scale, 1))
    return img


def write_pattern(path: str | Path, pattern, n: int, **kw) -> tuple[int, int]:
    img = pattern_image(pattern, n, **kw)
    atomic_write_bytes(Path(path), _png(img))
    return img.shape[1], img.shape[0]


@torch.no_grad()
def attention_weights(model, x: torch.Tensor, position: int) -> np.ndarray:
    """Softmax weights of query ``position`` over keys 0..position, per layer and head: [L, H, position+1].

    x: int64 [n] bytes; the model sees x[:position] (it predicts byte ``position``).
    """
    from .attention import per_head_patterns

    captured = []
    hooks = [blk.attn.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))
             for blk in model.blocks]
    try:
        model.eval()
        model(x[None, : position + 1])  # the hooks capture each block's attention input
    finally:
        for h in hooks:
            h.remove()
    out = []
    for blk, h in zip(model.blocks, captured):
        attn = blk.attn
        q, k, _ = attn.heads(h)
        q, k = q[0, :, position], k[0]  # (H, Dqk), (H, T, Dqk)
        scores = torch.einsum("hd,htd->ht", q.float(), k.float()) / math.sqrt(q.shape[-1])
        pats = per_head_patterns(attn.pattern, attn.n_head)
        allowed = torch.stack([p.mask(position + 1)[position] for p in pats])
        w = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out.append(torch.nan_to_num(w, nan=0.0).numpy())
    return np.stack(out)


def attention_image(weights: np.ndarray, base: np.ndarray, shape: list[int], position: int, scale: int = 4) -> np.ndarray:
    """A grid (layers x heads) of heat maps over ``shape`` = [rows, cols, channels] (channels summed).

    ``base``: uint8 [n] of the example, drawn in grey under the weights (red).
    """
    L, Hh, P = weights.shape
    rows, cols, ch = shape
    n = rows * cols * ch
    grey = np.zeros(n, dtype=np.float64)
    grey[: len(base)] = base[:n]
    grey = grey.reshape(rows, cols, ch).mean(-1) / 255.0
    cell_h, cell_w = rows * scale, cols * scale
    img = np.full((GAP + L * (cell_h + GAP), GAP + Hh * (cell_w + GAP), 3), 230, dtype=np.uint8)
    q_rc = divmod(position // ch, cols)
    for layer in range(L):
        for head in range(Hh):
            w = np.zeros(n)
            w[:P] = weights[layer, head]
            heat = w.reshape(rows, cols, ch).sum(-1)
            heat = heat / heat.max() if heat.max() > 0 else heat
            rgb = np.stack([0.35 * grey + 0.65 * heat, 0.35 * grey * (1 - heat), 0.35 * grey * (1 - heat)], -1)
            rgb[q_rc] = (0.2, 0.4, 1.0)  # the query in blue
            top, left = GAP + layer * (cell_h + GAP), GAP + head * (cell_w + GAP)
            img[top : top + cell_h, left : left + cell_w] = (255 * rgb).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    return img


def plot_runs(run_dirs: list[Path], path: str | Path, labels: list[str] | None = None) -> int:
    """Training (bits per dim per logged step) and validation curves of one or more runs; returns rows read."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot needs matplotlib: pip install 'sparse-transformer[plot]'") from None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    total = 0
    for i, d in enumerate(run_dirs):
        f = Path(d) / "metrics.jsonl"
        if not f.is_file():
            raise ValueError(f"{d}: no metrics.jsonl (is it a training run folder?)")
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        total += len(rows)
        label = labels[i] if labels else Path(d).name
        train = [(r["step"], r["bpb"]) for r in rows if "bpb" in r]
        val = [(r["step"], r["val_bpb"]) for r in rows if "val_bpb" in r]
        color = f"C{i}"
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.8, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, marker="o", linestyle="--", label=f"{label} validation")
    if not total:
        raise ValueError("the metrics files hold no rows")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per dim")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return total
