"""``sparse-transformer bench ...``: the parsers and the dispatch of every benchmark."""
from __future__ import annotations

import argparse
import sys

from .common import Parser as _Parser, UsageError, at_least, finite_at_least, no_extra
from .common import positive_ints as _positive_ints


def add(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (print a table, write JSON)")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    _add_attention(bsub)
    _add_sample(bsub)
    _add_compare(bsub)
    _add_context(bsub)
    _add_length(bsub)
    _add_train(bsub)


def _add_attention(bsub) -> None:
    att = bsub.add_parser(
        "attention",
        help="sparse vs dense causal attention: time, memory, FLOP rate",
        description=(
            "Times the forward and forward+backward of dense causal SDPA, Strided(~sqrt N) and "
            "Fixed(128, 16), measures peak memory in a fresh process, and reports speedups over "
            "dense and FLOP rates on the allowed pairs against a matrix product timed in the same run."
        ),
    )
    att.add_argument("--n", type=_positive_ints, default=[4096, 16384, 65536], help="sequence lengths (default 4096,16384,65536)")
    att.add_argument("--batch", type=at_least(1), default=1, help="B (default 1)")
    att.add_argument("--heads", type=at_least(1), default=4, help="H (default 4)")
    att.add_argument("--dim", type=at_least(1), default=64, help="head width D (default 64)")
    att.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    att.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    att.add_argument("--cases", default=None, help="comma list of pattern specs (strided:l, fixed:l:c, bigbird:..., any registered name) plus "
                     "the shorthands dense, strided (l ~ sqrt N), fixed[:l] (default dense,strided,fixed:128:16)")
    att.add_argument("--max-dense-n", type=at_least(1), default=None, help="skip the dense baseline above this N")
    att.add_argument("--no-malloc-tuning", action="store_true", help="leave glibc malloc at its defaults")
    att.add_argument("--against", choices=["flex"], default=None,
                     help="flex: compare the forward (CPU) with torch.compile'd FlexAttention on the same masks, "
                          "and our pattern description with create_block_mask")
    att.add_argument("--flex-blocks", type=_positive_ints, default=[128, 16],
                     help="FlexAttention block sizes for --against flex (default 128,16; 16 is its fastest here)")
    att.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH", help="write the results as JSON to PATH (stdout without PATH)")
    att.set_defaults(run=run_attention)


def _add_sample(bsub) -> None:
    sa = bsub.add_parser(
        "sample",
        help="decoding with the sparse KV cache: time per token, generation vs recompute, cache size",
        description="Times model.step at two or more positions, tokens/s for 1 and 8 samples and against a dense "
        "KV-cache baseline (the same weights attending every cached position), the prefill of a prompt as long "
        "as the last position against one forward pass, generation of --length tokens with the cache against "
        "an estimate of recomputing the full forward pass per token, and the KV cache size against dense.",
    )
    sa.add_argument("--positions", type=_positive_ints, default=[1024, 16384], help="two or more ascending positions, e.g. 1024,16384,65536 (default 1024,16384); "
                    "the ratio is last over first, the prefill and tokens/s are at the last")
    sa.add_argument("--length", type=at_least(1), default=4096, help="tokens to generate (default 4096)")
    sa.add_argument("--layers", type=at_least(1), default=8)
    sa.add_argument("--d-model", type=at_least(1), default=256)
    sa.add_argument("--heads", type=at_least(1), default=4)
    sa.add_argument("--stride", type=at_least(1), default=128)
    sa.add_argument("-c", type=at_least(1), default=16)
    sa.add_argument("--patterns", default="dense,strided,fixed")
    sa.add_argument("--no-malloc-tuning", action="store_true")
    sa.add_argument("--compile", action="store_true",
                    help="also time the compiled decoding step (torch.compile, static shapes) at each position, "
                         "and against the dense-cache baseline compiled the same way")
    sa.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    sa.set_defaults(run=run_sample)


def _add_compare(bsub) -> None:
    cp = bsub.add_parser(
        "compare",
        help="Table 2 analogue: dense vs strided vs fixed, bits per dim and time per iteration",
        description="Trains the same model with dense, strided and fixed attention for the same steps on the "
        "same data (text: tiny-shakespeare, context 2048, stride 64; images: Fashion-MNIST, 784 pixels, stride 28), "
        "then reports validation bits per dim and seconds per iteration, with xz/bz2/zlib on the same validation "
        "bytes as a floor. Default size: 4 layers, d 128, 4 heads; text 2000 steps of batch 1, images 1500 "
        "steps of batch 4 (about 30 minutes per modality on a 2-core CPU). Text models also rotate queries and keys "
        "by position (model.rotary, not in the paper) unless --no-rotary. --quick: 2 layers, d 32, 10 steps, for a smoke test.",
    )
    cp.add_argument("--modalities", default="text,images", help="comma list of text, images (default both)")
    cp.add_argument("--patterns", default="dense,strided,fixed")
    cp.add_argument("--steps", type=at_least(1), default=None, help="training steps per model (default 2000 text, 1500 images; --quick 10)")
    cp.add_argument("--precision", default="float32", choices=["float32", "bfloat16"],
                    help="training precision of every model (bfloat16: autocast; faster on CPUs with AVX512-BF16 or AMX)")
    cp.add_argument("--rotary", action=argparse.BooleanOptionalAction, default=None,
                    help="rotary position embeddings for every model (--rotary) or none (--no-rotary); default: "
                    "text yes, images no. Without them, dense and strided text models stay on a bigram plateau")
    cp.add_argument("--quick", action="store_true", help="tiny models and few steps (CI-sized)")
    cp.add_argument("--data-dir", default="data", help="where prepared datasets live (fashion-mnist must be prepared)")
    cp.add_argument("--out-dir", default=None, help="keep the runs here (default: a temporary folder)")
    cp.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    cp.set_defaults(run=run_compare)


def _add_context(bsub) -> None:
    cx = bsub.add_parser(
        "context",
        help="Table 3 analogue: bits per dim of one model with increasing minimum context",
        description="Evaluates CHECKPOINT so that every scored byte is predicted with at least K bytes of "
        "context, for each K, always on the same bytes of the split.",
    )
    cx.add_argument("checkpoint", help="a run folder, its ckpt.pt, or its model.safetensors (config.json beside it)")
    cx.add_argument("--contexts", type=_positive_ints, default=None,
                    help="minimum contexts (default 0 and 1/4, 1/2, 3/4, 7/8, 15/16 of n_ctx)")
    cx.add_argument("--max-bytes", type=at_least(0), default=65536, help="bytes to score (default 65536)")
    cx.add_argument("--split", default="val")
    cx.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    cx.set_defaults(run=run_context)


def _add_length(bsub) -> None:
    ln = bsub.add_parser(
        "length",
        help="Table 4 analogue: the longest context whose training step fits a memory budget",
        description="For each pattern, with and without recomputation, doubles the context until a training "
        "step (forward, backward, AdamW; batch 1) needs more than --budget-mb, then bisects. Each trial runs in "
        "a fresh process. Stride: the power of two nearest sqrt(n).",
    )
    ln.add_argument("--budget-mb", type=finite_at_least(0, strict=True), default=1024, help="memory budget in MB (default 1024)")
    ln.add_argument("--patterns", default="dense,strided,fixed")
    ln.add_argument("--start", type=at_least(1), default=1024, help="first context tried (default 1024)")
    ln.add_argument("--max-n", type=at_least(1), default=1 << 20, help="stop doubling here (default 1048576)")
    ln.add_argument("--bisect", type=at_least(1), default=3, help="bisection steps after doubling (default 3)")
    ln.add_argument("--layers", type=at_least(1), default=4)
    ln.add_argument("--d-model", type=at_least(1), default=64)
    ln.add_argument("--heads", type=at_least(1), default=2)
    ln.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ln.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    ln.set_defaults(run=run_length)


def _add_train(bsub) -> None:
    tr = bsub.add_parser(
        "train",
        help="time and peak memory of one training step, dense vs strided vs fixed",
        description="Times forward+backward+AdamW on random bytes for the same model with each attention "
        "pattern, each in a fresh process, and reports speedups over dense and peak memory.",
    )
    tr.add_argument("--n-ctx", type=at_least(1), default=8192, help="context length (default 8192)")
    tr.add_argument("--layers", type=_positive_ints, default=[8], help="comma list of depths (default 8), e.g. 8,64 with --recompute")
    tr.add_argument("--d-model", type=at_least(1), default=256)
    tr.add_argument("--heads", type=at_least(1), default=4)
    tr.add_argument("--batch", type=at_least(1), default=1)
    tr.add_argument("--patterns", default="dense,strided,fixed", help="comma list of dense, local, strided, fixed")
    tr.add_argument("--stride", type=at_least(1), default=None, help="stride (default: power of two nearest sqrt(n_ctx))")
    tr.add_argument("-c", type=at_least(1), default=16, help="summary width of fixed (default 16)")
    tr.add_argument("--recompute", action="store_true", help="gradient checkpointing of every block")
    tr.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    tr.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    tr.add_argument("--repeat", type=at_least(1), default=3)
    tr.add_argument("--no-malloc-tuning", action="store_true")
    tr.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH")
    tr.set_defaults(run=run_train)


def _bench_device(name: str | None) -> str:
    import torch

    device = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise UsageError(f"--device must be cpu or cuda (with a CUDA device available), got {device!r}")
    return device


def _emit(result: dict, report, json_path: str | None) -> int:
    """Print the table (unless JSON goes to stdout) and write the JSON."""
    from ..bench.common import write_json

    if json_path != "-":
        print(report(result))
    if json_path:
        write_json(result, json_path)
    return 0


def run_attention(args, extra) -> int:
    no_extra(extra)
    from ..bench import attention as ba

    device = _bench_device(args.device)
    for name in ("batch", "heads", "dim"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be >= 1")
    if args.against == "flex":
        from ..bench import flex

        if device == "cpu" and args.dtype != "float32":
            raise UsageError("--against flex on the CPU compares float32 (use --dtype float32)")
        result = flex.run(args.n, args.cases or ba.DEFAULT_CASES, B=args.batch, H=args.heads, D=args.dim,
                          blocks=tuple(args.flex_blocks), device=device, dtype=args.dtype,
                          progress=lambda m: print(m, file=sys.stderr))
        return _emit(result, flex.report, args.json)
    result = ba.run(
        args.n, B=args.batch, H=args.heads, D=args.dim, dtype=args.dtype, device=device,
        cases=args.cases or ba.DEFAULT_CASES, max_dense_n=args.max_dense_n,
        malloc_tuning=not args.no_malloc_tuning,
        progress=lambda m: print(m, file=sys.stderr),
    )
    return _emit(result, ba.report, args.json)


def run_sample(args, extra) -> int:
    no_extra(extra)
    from ..bench import sample as bs

    if len(args.positions) < 2 or sorted(set(args.positions)) != list(args.positions):
        raise UsageError("--positions takes two or more ascending positions, e.g. 1024,16384,65536")
    pats = _patterns(args.patterns)
    result = bs.run(positions=tuple(args.positions), gen_length=args.length, n_layer=args.layers,
                    d_model=args.d_model, n_head=args.heads, stride=args.stride, c=args.c, patterns=pats,
                    malloc_tuning=not args.no_malloc_tuning, compile=args.compile,
                    progress=lambda m: print(m, file=sys.stderr))
    return _emit(result, bs.report, args.json)


def run_train(args, extra) -> int:
    no_extra(extra)
    from ..bench import train as bt

    device = _bench_device(args.device)
    pats = _patterns(args.patterns)
    result = bt.run(
        n_ctx=args.n_ctx, layers=args.layers, d_model=args.d_model, n_head=args.heads, batch=args.batch,
        patterns=pats, stride=args.stride, c=args.c, recompute=args.recompute, precision=args.precision,
        device=device, repeat=args.repeat, malloc_tuning=not args.no_malloc_tuning,
        progress=lambda m: print(m, file=sys.stderr),
    )
    return _emit(result, bt.report, args.json)


def run_compare(args, extra) -> int:
    no_extra(extra)
    from ..bench import compare as bc

    mods = [m.strip() for m in args.modalities.split(",")]
    pats = _patterns(args.patterns)
    bad = [m for m in mods if m not in bc.MODALITIES]
    if bad:
        raise UsageError(f"--modalities: unknown {', '.join(bad)}; allowed: {', '.join(bc.MODALITIES)}")
    if args.steps is not None and args.steps < 1:
        raise UsageError("--steps must be >= 1")
    result = bc.run_compare(modalities=mods, patterns=pats, quick=args.quick, steps=args.steps, precision=args.precision,
                            rotary=args.rotary, data_dir=args.data_dir, out_dir=args.out_dir,
                            progress=lambda m: print(m, file=sys.stderr))
    return _emit(result, bc.report_compare, args.json)


def run_context(args, extra) -> int:
    no_extra(extra)
    from ..bench import compare as bc

    result = bc.run_context(args.checkpoint, contexts=args.contexts and sorted({0, *args.contexts}),
                            max_bytes=args.max_bytes, split=args.split, progress=lambda m: print(m, file=sys.stderr))
    return _emit(result, bc.report_context, args.json)


def run_length(args, extra) -> int:
    no_extra(extra)
    from ..bench import length as bl

    if args.budget_mb <= 0 or args.start < 2 or args.max_n < args.start:
        raise UsageError("--budget-mb must be > 0, --start >= 2 and --max-n >= --start")
    result = bl.run(budget_mb=args.budget_mb, patterns=_patterns(args.patterns), start=args.start,
                    max_n=args.max_n, steps=args.bisect, d_model=args.d_model, n_layer=args.layers,
                    n_head=args.heads, device=_bench_device(args.device), progress=lambda m: print(m, file=sys.stderr))
    return _emit(result, bl.report, args.json)


def _patterns(text: str) -> list[str]:
    pats = [p.strip() for p in text.split(",")]
    bad = [p for p in pats if p not in ("dense", "local", "strided", "fixed")]
    if bad:
        raise UsageError(f"--patterns: unknown {', '.join(bad)}; allowed: dense, local, strided, fixed")
    return pats


