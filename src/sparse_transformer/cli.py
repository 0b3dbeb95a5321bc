"""The ``sparse-transformer`` command line.

Every subcommand reports bad input as one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .cli_bench import add_bench as _add_bench
from .cli_bench import cmd_bench as _cmd_bench
from .cli_common import Parser as _Parser, at_least, finite_at_least
from .cli_common import UsageError, size_arg
from .train.guard import Diverged, Stopped
from .cli_pictures import add_pictures, cmd_plot, cmd_show_attention, cmd_show_pattern
from .sysutil import tune_malloc
from .train.distributed import DistributedFailure


def _add_train(sub) -> None:
    from .train.config import presets

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
    tr.add_argument("--print-config", action="store_true", help="print the resolved settings as JSON and exit")
    tr.add_argument("--force", action="store_true",
                    help="skip the check that the model and its activations fit in the device's available memory")

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
    ev.add_argument("--device", default="auto")
    ev.add_argument("--force", action="store_true", help="skip the check that the model fits in the device's available memory")
    ev.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                    help="write the result as JSON to PATH (stdout without PATH); default: eval-SPLIT.json beside the checkpoint")


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


def _cmd_train(args, extra) -> int:
    from .train.config import build_config
    from .train.loop import train

    cfg = build_config(args.preset, args.config, _overrides(extra))
    if args.resume:
        from .train.checkpoint import checkpoint_config, load_checkpoint
        from .train.config import set_key

        path = f"{cfg.train.out_dir}/ckpt.pt"
        cfg = checkpoint_config(load_checkpoint(path)["config"], path)
        for key, value in _overrides(extra):
            set_key(cfg, key, value)
        cfg.validate()
    if args.print_config:
        import json

        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    train(cfg, resume=args.resume, show_progress=not args.no_progress, force=args.force)
    return 0


def _cmd_eval(args, extra) -> int:
    from .bench.common import write_json
    from .data import load_dataset
    from .train.checkpoint import load_run
    from .train.evaluate import evaluate
    from .train.loop import pick_device
    from .train.precision import resolve as resolve_precision

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    device = pick_device(args.device)
    run = load_run(args.checkpoint, device, force=args.force)
    cfg = run.config
    ds = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir)
    precision, _ = resolve_precision(args.precision or cfg.train.precision, device)
    res = evaluate(run.model, ds.split(args.split), batch_size=args.batch_size, precision=precision, max_bytes=args.max_bytes)
    res.update({"precision": precision, "checkpoint": str(run.path), "split": args.split, "step": run.step,
                "dataset": ds.name, "ema": run.ema})
    if args.json != "-":
        step = f" (step {run.step})" if run.step is not None else ""
        print(f"{ds.name} {args.split}: {res['bits_per_dim']:.4f} bits per dim over {res['bytes']:,} bytes{step}")
    write_json(res, args.json or str(run.path.parent / f"eval-{args.split}.json"))
    return 0


def _add_sample(sub) -> None:
    sp = sub.add_parser(
        "sample",
        help="generate text or images from a checkpoint",
        description="Generate with the pattern-following KV cache. Text models print to stdout (or -o FILE); "
        "image models (model.data_shape = H x W x C) write one PNG grid; --complete INDEX keeps the top half "
        "of test image INDEX and writes original | kept half | completions side by side.",
    )
    sp.add_argument("checkpoint", help="a run folder, its ckpt.pt, or its model.safetensors (config.json beside it)")
    sp.add_argument("-n", type=at_least(1), default=1, help="number of samples (default 1)")
    sp.add_argument("--length", type=at_least(1), default=None, help="steps to generate for text (default min(500, n_ctx)) and audio (default n_ctx)")
    sp.add_argument("--temperature", type=finite_at_least(0), default=1.0, help="softmax temperature; 0 means argmax (default 1.0)")
    sp.add_argument("--prompt", default=None, help="text to continue (text models)")
    sp.add_argument("--complete", default=None, metavar="INDEX_OR_FILE",
                    help="image models: complete the top half of test image INDEX, or of an image FILE of the model's size")
    sp.add_argument("--seed", type=at_least(0), default=0)
    sp.add_argument("-o", "--out", default=None, help="output file (text: default stdout; images: samples.png; audio: samples.wav)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--force", action="store_true", help="skip the check that the model fits in the device's available memory")


def _cmd_sample(args, extra) -> int:
    from .data import load_dataset
    from .sampling import sample
    from .train.checkpoint import load_run
    from .train.loop import pick_device

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    if args.n < 1:
        raise UsageError("-n must be >= 1")
    if args.prompt is not None and args.complete is not None:
        raise UsageError("give --prompt or --complete, not both")
    run = load_run(args.checkpoint, pick_device(args.device), force=args.force)
    model, cfg, modality = run.model, run.config, run.modality
    image = modality == "image"
    if args.complete is not None and not image:
        raise UsageError("--complete is for image models; use --prompt TEXT for a text model")
    if args.prompt is not None and modality != "text":
        raise UsageError(f"--prompt is for text models; this is an {modality} model")
    if args.length is not None and args.length < 1:
        raise UsageError("--length must be >= 1")
    complete = None
    if args.complete is not None and not args.complete.lstrip("-").isdigit():
        from .data.formats import read_images

        H, W, C = cfg.model.data_shape
        if C not in (1, 3):
            raise UsageError(f"--complete FILE needs a model of 1 or 3 channels, this one has {C}")
        complete = read_images([Path(args.complete)], (H, W), C).reshape(-1)
    elif args.complete is not None:
        args.complete = int(args.complete)
        ds = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir)
        split = ds.split("test" if "test" in ds.splits else "val")
        size = 1
        for d in cfg.model.data_shape:
            size *= d
        count = len(split) // max(size, 1)
        if not 0 <= args.complete < count:
            raise UsageError(f"--complete must be in [0, {count - 1}], got {args.complete}")
        complete = np.asarray(split[args.complete * size : (args.complete + 1) * size])
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(unit="byte", leave=False, file=sys.stderr)
    try:
        msg = sample(model, n=args.n, temperature=args.temperature, seed=args.seed, out=args.out,
                     prompt=(args.prompt or "").encode("utf-8"), length=args.length, complete=complete,
                     progress=bar.update if bar is not None else None, modality=modality)
    finally:
        if bar is not None:
            bar.close()
    print(msg, file=sys.stderr)
    return 0


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="prepare datasets as uint8 .bin files + meta.json")
    dsub = data.add_subparsers(dest="data", required=True, parser_class=_Parser)
    prep = dsub.add_parser(
        "prepare",
        help="download or import a dataset",
        description="Prepare a dataset into DATA_DIR/NAME: train.bin, val.bin[, test.bin] (raw uint8, images in "
        "row, column, channel order; audio as 12 kHz 8-bit mu-law) and meta.json. Named datasets: enwik8 "
        "(90M/5M/5M bytes), shakespeare (tiny-shakespeare, 90/10), cifar10 (48,000 train / 2,000 validation / "
        "10,000 test), imagenet64 (downsampled ImageNet .npz files; --from only, it needs an account), "
        "fashion-mnist (58,000/2,000/10,000). Generic: text (files), images (a folder of PNG/JPEG of one size), "
        "audio (WAV/FLAC/OGG files; needs the [audio] extra). Without --from, named datasets are downloaded "
        "into DATA_DIR/downloads with resume and checksum verification. A prepared dataset is never overwritten.",
    )
    prep.add_argument("name", help="enwik8, shakespeare, cifar10, imagenet64, fashion-mnist, text, images or audio")
    prep.add_argument("--from", dest="source", default=None, metavar="PATH", help="import this local copy (file, folder or archive) instead of downloading")
    prep.add_argument("--dir", dest="data_dir", default="data", help="where prepared datasets live (default data/)")
    prep.add_argument("--size", type=size_arg, default=None, metavar="HxW", help="images: the size every image must have (default: the first image's)")
    prep.add_argument("--channels", type=int, choices=[1, 3], default=3, help="images: 1 (grayscale) or 3 (RGB, default)")
    prep.add_argument("--fraction", type=float, default=0.9, help="text, images, audio: training share (default 0.9)")
    prep.add_argument("--mirror", default=None, metavar="URL", help="download the files from URL/FILE instead of their canonical location")


def _cmd_data(args, extra) -> int:
    from .data.prepare import prepare

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    meta = prepare(args.name, args.source, args.data_dir, args.fraction, size=args.size, channels=args.channels,
                   mirror=args.mirror, progress=lambda m: print(m, file=sys.stderr))
    sizes = ", ".join(f"{k} {v:,}" for k, v in meta["splits"].items())
    print(f"prepared {args.name} in {args.data_dir}/{args.name}: {sizes} bytes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sparse-transformer",
        description="Sparse Transformers (Child et al., 2019): exact strided and fixed attention in PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_train(sub)
    _add_sample(sub)
    _add_data(sub)
    _add_bench(sub)
    add_pictures(sub)
    return parser


COMMANDS = {"train": _cmd_train, "eval": _cmd_eval, "sample": _cmd_sample, "data": _cmd_data, "bench": _cmd_bench,
            "show-pattern": cmd_show_pattern, "show-attention": cmd_show_attention, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "no_malloc_tuning", False):
        tune_malloc()
    try:
        return COMMANDS[args.command](args, extra)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as e:
        print(f"sparse-transformer: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"sparse-transformer: error: {e}", file=sys.stderr)
        return 3
    except Stopped as e:
        print(f"sparse-transformer: {e}", file=sys.stderr)
        return e.code
    except DistributedFailure as e:
        print(f"sparse-transformer: error: {e}; the last checkpoint on disk is intact", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sparse-transformer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
