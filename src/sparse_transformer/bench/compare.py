"""``bench compare`` (the paper's Table 2) and ``bench context`` (its Table 3), at CPU scale.

compare: the same model, steps and data with dense, strided and fixed
attention, on text (tiny-shakespeare, context 2048) and images
(Fashion-MNIST, 784 pixels, stride 28): validation bits per dim and time per
iteration, next to what xz, bz2 and zlib achieve on the same validation bytes
(a floor any model must beat).

context: one trained model evaluated so that every scored byte sees at least
k bytes of context, for increasing k, always on the same scored bytes.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_dataset
from ..data.compressors import compressor_bits
from ..train.config import build_config
from ..train.evaluate import evaluate
from ..train.loop import train
from .common import machine_info, table

# Per modality: the data, the model's layout and the attention settings (stride ~ sqrt(n_ctx); a row for images).
# Text adds rotary position embeddings (model.rotary, not in the paper): with context 2048 and one passage per
# step, the paper's learned embeddings alone leave dense and strided models on a byte-bigram plateau for thousands
# of steps (BENCHMARKS.md, "the text plateau"). Images keep the paper's (row, column, channel) embeddings.
MODALITIES = {
    "text": {"data": "shakespeare", "n_ctx": 2048, "stride": 64, "c": 16, "data_shape": None, "steps": 2000, "batch": 1,
             "rotary": True},
    "images": {"data": "fashion-mnist", "n_ctx": 784, "stride": 28, "c": 7, "data_shape": "28x28x1", "steps": 1500,
               "batch": 4, "rotary": False},
}
FULL = {"d_model": 128, "n_layer": 4, "n_head": 4, "steps": 0, "batch_size": 0, "eval_bytes": 0}  # 0: per modality
QUICK = {"d_model": 32, "n_layer": 2, "n_head": 2, "steps": 10, "batch_size": 2, "eval_bytes": 4 * 784}


def run_compare(
    *, modalities=("text", "images"), patterns=("dense", "strided", "fixed"), quick: bool = False,
    steps: int | None = None, precision: str = "float32", rotary: bool | None = None, data_dir: str = "data",
    out_dir: str | None = None, progress=print,
) -> dict:
    size = dict(QUICK if quick else FULL)
    if steps:
        size["steps"] = steps
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="bench-compare-"))
    rows = []
    for modality in modalities:
        m = MODALITIES[modality]
        n_steps = size["steps"] or m["steps"]
        batch = size["batch_size"] or m["batch"]
        ds = load_dataset(m["data"], data_dir=data_dir)  # a clear error when it is not prepared
        val = np.asarray(ds.split("val"))
        n_eval = size["eval_bytes"] or len(val)
        n_ctx = m["n_ctx"] if not quick or modality == "images" else 256
        stride = m["stride"] if not quick or modality == "images" else 16
        rot = m["rotary"] if rotary is None else rotary
        floor = compressor_bits(val[:n_eval].tobytes())
        rows.append({"modality": modality, "model": "compressors", "val_bits_per_dim": floor["xz"], **floor})
        progress(f"{modality}: xz {floor['xz']:.3f}, bz2 {floor['bz2']:.3f}, zlib {floor['zlib']:.3f} bits/dim")
        for pattern in patterns:
            overrides = [
                ("model.n_ctx", str(n_ctx)), ("model.stride", str(stride)), ("model.c", str(min(m["c"], stride))),
                ("model.pattern", pattern), ("model.combine", "merged"), ("model.d_model", str(size["d_model"])),
                ("model.n_layer", str(size["n_layer"])), ("model.n_head", str(size["n_head"])),
                ("model.rotary", "true" if rot else "false"),
                ("train.steps", str(n_steps)), ("train.batch_size", str(batch)),
                ("train.warmup", str(max(1, n_steps // 10))), ("train.eval_every", "0"),
                ("train.eval_max_bytes", str(n_eval)), ("train.sample_bytes", "0"), ("train.time_limit", "0"),
                ("train.schedule", "steps"),
                ("train.log_every", str(max(1, n_steps // 20))), ("train.precision", precision),
                ("train.out_dir", str(root / f"{modality}-{pattern}")), ("data.name", m["data"]), ("data.dir", data_dir),
            ]
            if m["data_shape"]:
                overrides.append(("model.data_shape", m["data_shape"]))
            cfg = build_config("quick", None, overrides)
            summary = train(cfg, show_progress=False, echo=lambda *_: None)
            row = {"modality": modality, "model": pattern, "rotary": rot, "n_ctx": n_ctx, "stride": stride,
                   "batch": batch,
                   "steps": summary["steps"], "s_per_iter": summary["train_seconds"] / max(summary["steps"], 1),
                   "val_bits_per_dim": summary["val_bits_per_dim"], "val_bytes": summary["val_bytes"],
                   "parameters": summary["parameters"], "run_dir": summary["out_dir"]}
            rows.append(row)
            progress(f"{modality}, {pattern}: {row['val_bits_per_dim']:.4f} bits/dim, {row['s_per_iter']:.3f} s/iter")
    return {"benchmark": "compare", "config": {**size, "quick": quick, "precision": precision, "modalities": list(modalities)},
            "machine": machine_info(torch.device("cpu")), "results": rows}


def min_context_bits(model, data: np.ndarray, k: int, start: int, end: int, batch: int = 4) -> float:
    """Bits per dim over data[start:end], each byte predicted with at least ``k`` bytes of context
    (``evaluate`` with ``min_context=k`` on the bytes from start - k). Needs start >= k."""
    if start < k:
        raise ValueError(f"minimum context must be at most the first scored position, got {k} > {start}")
    return evaluate(model, data[start - k : end], batch_size=batch, min_context=k)["bits_per_dim"]


def run_context(checkpoint: str, *, contexts: list[int] | None = None, max_bytes: int = 65536, split: str = "val",
                progress=print) -> dict:
    from ..train.checkpoint import load_run

    run = load_run(checkpoint)
    model, cfg = run.model, run.config
    n = cfg.model.n_ctx
    contexts = sorted(contexts or sorted({0, n // 4, n // 2, 3 * n // 4, n - n // 8, n - n // 16}))
    if contexts[-1] >= n:
        raise ValueError(f"minimum contexts must be below model.n_ctx={n}, got {contexts[-1]}")
    data = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir).split(split)
    start = contexts[-1]
    end = min(len(data), start + max_bytes)
    if end <= start:
        raise ValueError(f"the {split} split ({len(data)} bytes) is shorter than the largest minimum context {start}")
    rows = []
    for k in contexts:
        t0 = time.perf_counter()
        bits = min_context_bits(model, data, k, start, end)
        rows.append({"min_context": k, "bits_per_dim": bits, "seconds": time.perf_counter() - t0})
        progress(f"minimum context {k}: {bits:.4f} bits/dim")
    return {"benchmark": "context", "config": {"checkpoint": str(checkpoint), "n_ctx": n, "split": split,
            "scored_bytes": end - start, "first_scored": start}, "machine": machine_info(torch.device("cpu")),
            "results": rows}


def report_compare(result: dict) -> str:
    c = result["config"]
    head = f"compare: {c['n_layer']} layers, d {c['d_model']}, {c['n_head']} heads{' (quick)' if c['quick'] else ''}"
    head += f", {c.get('precision', 'float32')}"
    cols = [("modality", "data"), ("model", "model"), ("rotary", "rotary"), ("n_ctx", "context"), ("batch", "batch"),
            ("steps", "steps"),
            ("s_per_iter", "s/iter"), ("val_bits_per_dim", "val bits/dim"), ("xz", "xz"), ("bz2", "bz2"), ("zlib", "zlib")]
    return head + "\n" + table(result["results"], cols)


def report_context(result: dict) -> str:
    c = result["config"]
    head = f"context: {c['checkpoint']}, n_ctx {c['n_ctx']}, {c['scored_bytes']:,} bytes of {c['split']}"
    return head + "\n" + table(result["results"], [("min_context", "min context"), ("bits_per_dim", "bits/dim"), ("seconds", "s")])
