"""``sparse-transformer sample``: text, images or audio from a run, with the pattern-following KV cache."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .common import UsageError, at_least, finite_at_least


def add(sub) -> None:
    sp = sub.add_parser(
        "sample",
        help="generate text, images or audio from a checkpoint",
        description="Generate with the pattern-following KV cache (a prompt is prefilled in one pass). Text "
        "models print to stdout (or -o FILE); image models (model.data_shape = H x W x C) write one PNG grid; "
        "--complete INDEX keeps the top half of test image INDEX and writes original | kept half | completions "
        "side by side; audio models write one WAV file (12 kHz, the samples a quarter second apart).",
    )
    sp.add_argument("checkpoint", help="a run folder, its ckpt.pt, or its model.safetensors (config.json beside it)")
    sp.add_argument("-n", type=at_least(1), default=1, help="number of samples (default 1)")
    sp.add_argument("--length", type=at_least(1), default=None, help="steps to generate for text (default min(500, n_ctx)) and audio (default n_ctx)")
    sp.add_argument("--temperature", type=finite_at_least(0), default=1.0, help="softmax temperature; 0 means argmax (default 1.0)")
    sp.add_argument("--prompt", default=None, help="text to continue (text models)")
    sp.add_argument("--prompt-audio", default=None, metavar="FILE",
                    help="audio models: continue this recording (WAV, FLAC or OGG; mono, 12 kHz, mu-law as in "
                         "training), prefilled in one pass; the output starts with it")
    sp.add_argument("--complete", default=None, metavar="INDEX_OR_FILE",
                    help="image models: complete the top half of test image INDEX, or of an image FILE of the model's size")
    sp.add_argument("--seed", type=at_least(0), default=0)
    sp.add_argument("-o", "--out", default=None, help="output file (text: default stdout; images: samples.png; audio: samples.wav)")
    sp.add_argument("--device", default="auto")
    sp.add_argument("--no-progress", action="store_true")
    sp.add_argument("--compile", action="store_true",
                    help="compile the decoding step once (torch.compile; ~10 s to compile, then about 2x faster "
                         "per step for small models on a CPU); default eager")
    sp.add_argument("--force", action="store_true", help="skip the check that the model fits in the device's available memory")
    sp.set_defaults(run=run)


def run(args, extra) -> int:
    from ..data import load_dataset
    from ..sampling import sample
    from ..train.checkpoint import load_run
    from ..train.loop import pick_device

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
    prompt = (args.prompt or "").encode("utf-8")
    if args.prompt_audio is not None:
        if modality != "audio":
            raise UsageError(f"--prompt-audio is for audio models; this is a {modality} model")
        from ..data.formats import mu_law_encode, read_audio

        prompt = mu_law_encode(read_audio(Path(args.prompt_audio))).astype(np.uint8).tobytes()
        if len(prompt) >= cfg.model.n_ctx:
            raise UsageError(f"--prompt-audio has {len(prompt)} steps at 12 kHz; the model's context is "
                             f"{cfg.model.n_ctx}: use a shorter recording")
    if args.length is not None and args.length < 1:
        raise UsageError("--length must be >= 1")
    complete = None
    if args.complete is not None and not args.complete.lstrip("-").isdigit():
        from ..data.formats import read_images

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
                     prompt=prompt, length=args.length, complete=complete,
                     progress=bar.update if bar is not None else None, modality=modality,
                     compile=args.compile)
    finally:
        if bar is not None:
            bar.close()
    print(msg, file=sys.stderr)
    return 0
