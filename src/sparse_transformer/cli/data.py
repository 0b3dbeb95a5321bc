"""``sparse-transformer data prepare``: datasets as uint8 .bin files + meta.json."""
from __future__ import annotations

import sys

from .common import Parser, UsageError, finite_at_least, size_arg


def add(sub) -> None:
    data = sub.add_parser("data", help="prepare datasets as uint8 .bin files + meta.json")
    dsub = data.add_subparsers(dest="data", required=True, parser_class=Parser)
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
    prep.add_argument("--resize", type=size_arg, default=None, metavar="HxW", help="images: resize every image to HxW (Lanczos)")
    prep.add_argument("--fraction", type=finite_at_least(0, strict=True), default=0.9,
                      help="text, images, audio: training share (default 0.9)")
    prep.add_argument("--test-fraction", type=finite_at_least(0), default=0.0,
                      help="text, images, audio: a test split of this share, from the end (default none); validation is the rest")
    prep.add_argument("--name", dest="out_name", default=None, metavar="NAME",
                      help="text, images, audio: the prepared folder DATA_DIR/NAME (default: the kind, e.g. images)")
    prep.add_argument("--mirror", default=None, metavar="URL", help="download the files from URL/FILE instead of their canonical location")
    prep.set_defaults(run=run)


def run(args, extra) -> int:
    from ..data.prepare import prepare

    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
    if args.resize and args.size:
        raise UsageError("give --size (every image must have it) or --resize (every image gets it), not both")
    meta = prepare(args.name, args.source, args.data_dir, args.fraction, size=args.resize or args.size,
                   resize=args.resize is not None, channels=args.channels, mirror=args.mirror,
                   out_name=args.out_name, test_fraction=args.test_fraction,
                   progress=lambda m: print(m, file=sys.stderr))
    sizes = ", ".join(f"{k} {v:,}" for k, v in meta["splits"].items())
    print(f"prepared {args.name} in {args.data_dir}/{meta['name']}: {sizes} bytes")
    return 0
