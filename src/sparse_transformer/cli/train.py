"""``sparse-transformer train``: settings from a preset, a TOML file and --section.key overrides."""
from __future__ import annotations

import json

from .common import UsageError


def add(sub) -> None:
    from ..train.config import presets

    tr = sub.add_parser(
        "train",
        help="train a Sparse Transformer (default: the quick preset on Python's own docs)",
        description=(
            "Train a Sparse Transformer. Settings come from a preset, then a TOML file, then "
            "overrides such as --model.n_layer 8 --train.steps 500 --data.name PATH. "
            f"Presets: {', '.join(presets())}. Writes ckpt.pt, metrics.jsonl, model.safetensors, "
            "config.json and summary.json into train.out_dir."
        ),
        epilog="Settings: model.* (n_ctx, d_model, n_layer, n_head, pattern, stride, c, combine, ...), "
        "train.* (steps, batch_size, lr, warmup, precision, ema, compile, device, out_dir, ...), data.* (name, train_fraction). "
        "An unknown setting is an error that lists the allowed ones. Under torchrun "
        "(torchrun --nproc_per_node=N -m sparse_transformer train ...) training is data-parallel: "
        "train.parallel ddp (default) or fsdp, train.grad_reduce_dtype, train.dist_timeout; "
        "train.batch_size is the global batch.",
    )
    tr.add_argument("--preset", default=None, help="preset name (default quick, unless --config is given)")
    tr.add_argument("--config", default=None, metavar="FILE", help="a TOML file with [model], [train], [data] tables")
    tr.add_argument("--resume", action="store_true", help="continue from train.out_dir/ckpt.pt")
    tr.add_argument("--no-progress", action="store_true", help="no progress bar")
    tr.add_argument("--print-config", action="store_true",
                    help="print the settings the run would use (resolved against its data) as JSON and exit")
    tr.add_argument("--force", action="store_true",
                    help="skip the check that the model and its activations fit in the device's available memory")
    tr.set_defaults(run=run)


def _overrides(extra: list[str]) -> list[tuple[str, str]]:
    pairs = []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--") or "." not in arg:
            raise UsageError(f"unrecognised argument {arg!r}; settings look like --model.n_layer 8")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
        else:
            if i + 1 >= len(extra):
                raise UsageError(f"{arg} needs a value")
            i += 1
            value = extra[i]
        pairs.append((key, value))
        i += 1
    return pairs


def run(args, extra) -> int:
    from ..train.config import build_config
    from ..train.loop import train

    overrides = _overrides(extra)
    if args.resume:  # the checkpoint's settings, then the command line's: built once, from the checkpoint
        from ..train.checkpoint import checkpoint_config, load_checkpoint
        from ..train.config import set_key

        out_dir = dict(overrides).get("train.out_dir") or build_config(args.preset, args.config, []).train.out_dir
        path = f"{out_dir}/ckpt.pt"
        cfg = checkpoint_config(load_checkpoint(path)["config"], path)
        for key, value in overrides:
            set_key(cfg, key, value)
        cfg.validate()
    else:
        cfg = build_config(args.preset, args.config, overrides)
    if args.print_config:  # the settings the run would use: resolved against its data (images set the shape)
        from ..data import load_dataset
        from ..train.config import resolve

        cfg, _ = resolve(cfg, load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir))
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg, resume=args.resume, show_progress=not args.no_progress, force=args.force)
    return 0
