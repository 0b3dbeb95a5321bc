"""``show-pattern``, ``show-attention`` and ``plot``: the command lines of pictures.py."""
from __future__ import annotations

import sys
from pathlib import Path

from .common import UsageError, at_least


def add(sub) -> None:
    sp = sub.add_parser(
        "show-pattern", help="draw an attention pattern (the paper's Figure 3)",
        description="Draws the n x n connectivity matrix (blue: query row i may attend key column j) and, beside "
        "it, the positions one query attends to laid out in rows of --width (red: the query). One row of panels "
        "per head with --heads and --distinct-heads (fixed), or per factor with --factors.",
    )
    sp.add_argument("pattern", help="dense, local, strided or fixed (with --stride, -c, --distinct-heads), "
                    "or any pattern spec such as fixed:8:2 or strided_columns:8")
    sp.add_argument("--stride", type=at_least(1), default=8, help="stride l (local: the window; default 8)")
    sp.add_argument("-c", type=at_least(1), default=2, help="fixed: summary width c (default 2)")
    sp.add_argument("-n", type=at_least(1), default=64, help="sequence length (default 64)")
    sp.add_argument("--heads", type=at_least(1), default=1, help="draw this many heads (default 1)")
    sp.add_argument("--distinct-heads", action="store_true", help="fixed: a different summary offset per head")
    sp.add_argument("--factors", action="store_true", help="also draw each factor of the pattern")
    sp.add_argument("--query", type=at_least(0), default=None, help="the query of the right-hand panel (default n-1)")
    sp.add_argument("--width", type=at_least(1), default=None, help="row width of the right-hand panel (default the stride)")
    sp.add_argument("--scale", type=at_least(1), default=None, help="pixels per cell (default: about 512 pixels across)")
    sp.add_argument("-o", "--out", default="pattern.png")
    sp.set_defaults(run=cmd_show_pattern)

    sa = sub.add_parser(
        "show-attention", help="draw a trained model's attention for one position (the paper's Figure 2)",
        description="Runs CHECKPOINT on one example and draws the attention weights of query --position for every "
        "layer (rows) and head (columns): red where the query attends, over the example in grey for image "
        "models; text and audio are laid out in rows of the stride.",
    )
    sa.add_argument("checkpoint", help="a run folder, its ckpt.pt, or its model.safetensors (config.json beside it)")
    sa.add_argument("--position", type=at_least(0), required=True, help="the query position")
    sa.add_argument("--index", type=at_least(0), default=0, help="which example (image) or window (text) of the split")
    sa.add_argument("--split", default="val")
    sa.add_argument("--scale", type=at_least(1), default=4)
    sa.add_argument("-o", "--out", default="attention.png")
    sa.set_defaults(run=cmd_show_attention)

    pl = sub.add_parser("plot", help="training and validation curves of one or more runs",
                        description="Reads RUN_DIR/metrics.jsonl of each run and plots bits per dim against step.")
    pl.add_argument("runs", nargs="+", metavar="RUN_DIR")
    pl.add_argument("--labels", default=None, help="comma list, one per run (default: the folder names)")
    pl.add_argument("-o", "--out", default="curves.png")
    pl.set_defaults(run=cmd_plot)


def cmd_show_pattern(args, extra) -> int:
    from .. import patterns as P
    from ..pictures import write_pattern

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    if not 1 <= args.n <= 4096:
        raise UsageError(f"-n must be in [1, 4096] for a picture, got {args.n}")
    if args.heads < 1:
        raise UsageError("--heads must be >= 1")
    legacy = {"dense": lambda: P.Dense(), "local": lambda: P.Local(args.stride), "strided": lambda: P.Strided(args.stride),
              "fixed": lambda: P.Fixed(args.stride, args.c, distinct_heads=args.distinct_heads)}
    pattern = legacy[args.pattern]() if args.pattern in legacy else P.parse(args.pattern)
    scale = args.scale or max(1, 512 // args.n)
    w, h = write_pattern(args.out, pattern, args.n, heads=args.heads, factors=args.factors, query=args.query,
                         width=args.width or getattr(pattern, "stride", getattr(pattern, "window", None)), scale=scale)
    print(f"wrote {args.out} ({w}x{h})", file=sys.stderr)
    return 0


def cmd_show_attention(args, extra) -> int:
    import numpy as np
    import torch

    from ..data import load_dataset
    from ..pictures import _png, attention_image, attention_weights
    from ..sysutil import atomic_write_bytes
    from ..train.checkpoint import load_run

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    run = load_run(args.checkpoint)
    model, cfg = run.model, run.config
    n = cfg.model.n_ctx
    if not 0 <= args.position < n:
        raise UsageError(f"--position must be in [0, {n - 1}], got {args.position}")
    data = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir).split(args.split)
    count = len(data) // n
    if not 0 <= args.index < count:
        raise UsageError(f"--index must be in [0, {count - 1}], got {args.index}")
    x = np.asarray(data[args.index * n : (args.index + 1) * n])
    weights = attention_weights(model, torch.from_numpy(x.astype(np.int64)), args.position)
    shape = list(cfg.model.data_shape) if len(cfg.model.data_shape) == 3 else [-(-n // cfg.model.stride), cfg.model.stride, 1]
    img = attention_image(weights, x, shape, args.position, scale=args.scale)
    atomic_write_bytes(Path(args.out), _png(img))
    print(f"wrote {args.out} ({img.shape[1]}x{img.shape[0]}): {weights.shape[0]} layers x {weights.shape[1]} heads",
          file=sys.stderr)
    return 0


def cmd_plot(args, extra) -> int:
    from ..pictures import plot_runs

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    labels = args.labels.split(",") if args.labels else None
    if labels and len(labels) != len(args.runs):
        raise UsageError(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    rows = plot_runs([Path(r) for r in args.runs], args.out, labels)
    print(f"wrote {args.out} ({rows} logged rows from {len(args.runs)} runs)", file=sys.stderr)
    return 0
