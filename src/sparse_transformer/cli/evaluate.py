"""``sparse-transformer eval``: bits per dim of a run on a split."""
from __future__ import annotations

from .common import UsageError, at_least


def add(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="bits per dim of a checkpoint on a split",
        description="Evaluate a checkpoint: mean NLL / ln 2 over the whole split, in fixed non-overlapping windows.",
    )
    ev.add_argument("checkpoint", help="a run folder, its ckpt.pt, or its model.safetensors (config.json beside it)")
    ev.add_argument("--split", default="val", help="val (default) or test")
    ev.add_argument("--batch-size", type=at_least(1), default=8)
    ev.add_argument("--max-bytes", type=at_least(0), default=0, help="evaluate only the first bytes of the split (0 = all)")
    ev.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default=None,
                    help="autocast precision of the evaluation (default: the run's train.precision)")
    ev.add_argument("--dynamic", type=float, default=0.0, metavar="LR",
                    help="dynamic evaluation: after scoring each window the model takes one SGD step at this "
                         "learning rate on it (0.2 suits the quick preset's model), so it adapts as it reads, like a compressor; "
                         "windows run one at a time. Default 0: the model as it is")
    ev.add_argument("--device", default="auto")
    ev.add_argument("--force", action="store_true", help="skip the check that the model fits in the device's available memory")
    ev.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the result as JSON to PATH (stdout without PATH); default: eval-SPLIT.json beside the checkpoint")
    ev.set_defaults(run=run)


def run(args, extra) -> int:
    from ..bench.common import write_json
    from ..data import load_dataset
    from ..train.checkpoint import load_run
    from ..train.evaluate import evaluate, evaluate_dynamic
    from ..train.loop import pick_device
    from ..train.precision import resolve as resolve_precision

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    device = pick_device(args.device)
    run = load_run(args.checkpoint, device, force=args.force)
    cfg = run.config
    ds = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir)
    precision, _ = resolve_precision(args.precision or cfg.train.precision, device)
    if not (args.dynamic >= 0 and args.dynamic < float("inf")):
        raise UsageError(f"--dynamic must be a learning rate >= 0, got {args.dynamic}")
    if args.dynamic:
        res = evaluate_dynamic(run.model, ds.split(args.split), lr=args.dynamic, grad_clip=cfg.train.grad_clip,
                               precision=precision, max_bytes=args.max_bytes)
    else:
        res = evaluate(run.model, ds.split(args.split), batch_size=args.batch_size, precision=precision,
                       max_bytes=args.max_bytes)
    res.update({"precision": precision, "checkpoint": str(run.path), "split": args.split, "step": run.step,
                "dataset": ds.name, "ema": run.ema})
    if args.json != "-":
        step = f" (step {run.step})" if run.step is not None else ""
        how = f", dynamic evaluation at {args.dynamic:g}" if args.dynamic else ""
        print(f"{ds.name} {args.split}: {res['bits_per_dim']:.4f} bits per dim over {res['bytes']:,} bytes{step}{how}")
    write_json(res, args.json or str(run.path.parent / f"eval-{args.split}.json"))
    return 0
