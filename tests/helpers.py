"""Shared test helpers: the CLI runners, the tiny training config, datasets, pattern lists."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np

from sparse_transformer import patterns as P
from sparse_transformer.train.config import build_config

TINY = [
    ("model.n_ctx", "64"), ("model.d_model", "32"), ("model.n_layer", "2"), ("model.n_head", "2"),
    ("model.stride", "8"), ("model.dropout", "0.1"), ("train.batch_size", "4"), ("train.warmup", "2"),
    ("train.eval_max_bytes", "2000"), ("train.sample_bytes", "16"), ("train.log_every", "1"),
    ("train.precision", "float32"),  # explicit: per-step losses reproducible on every CPU ("auto" may pick bfloat16)
    # The default (the main job) schedules by the clock: its learning rate depends on the wall time, so two
    # runs differ in the last bits. Tests that compare runs exactly schedule by steps.
    ("train.schedule", "steps"), ("train.time_limit", "0"),
]


def tiny(tmp_path, *extra, steps=6):
    """A RunConfig of a 2-layer model that trains in about a second, writing into tmp_path."""
    return build_config(None, None, TINY + [("train.steps", str(steps)), ("train.out_dir", str(tmp_path))] + list(extra))


def losses(run_dir: Path) -> dict[int, float]:
    """{step: training loss} from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_cli(*args, timeout: float = 600, env=None) -> subprocess.CompletedProcess:
    """``sparse-transformer ARGS`` in a fresh interpreter."""
    return subprocess.run([sys.executable, "-m", "sparse_transformer", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def cli_here(*args) -> subprocess.CompletedProcess:
    """``sparse-transformer ARGS`` in this process: ``cli.main`` with stdout and stderr captured (argparse's
    exit turned into its code). A fresh interpreter spends about 3 s importing torch, so tests of bad input,
    which stop before any real work, run here; whatever must hold of a real process (signals, the entry
    point, state that a command leaves behind) uses ``run_cli``."""
    from sparse_transformer.cli import main

    out, err = io.StringIO(), io.StringIO()
    # leave the test process's malloc as it is
    with mock.patch.dict(os.environ, {"SPARSE_TRANSFORMER_NO_MALLOC_TUNING": "1"}), \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors exit 2, --help 0
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def assert_one_line_error(r: subprocess.CompletedProcess, *parts: str) -> None:
    """Exit code 2, one line on stderr that contains every one of ``parts``, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    for part in parts:
        assert part in r.stderr, (part, r.stderr)


def tiny_images(root: Path, name: str = "imgs", shape=(4, 4, 3), counts=(("train", 20), ("val", 4))) -> Path:
    """A prepared image dataset of random pixels under root/name (as `data prepare` writes it)."""
    data = root / name
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    size = int(np.prod(shape))
    for split, count in counts:
        (data / f"{split}.bin").write_bytes(rng.integers(0, 256, count * size, dtype=np.uint8).tobytes())
    (data / "meta.json").write_text(json.dumps({"name": name, "modality": "image", "shape": list(shape),
                                                "splits": {s: c * size for s, c in counts}}))
    return data


def every_pattern(stride: int, c: int) -> list:
    """One of each pattern and factor, with distinct-head variants."""
    return [
        P.Dense(),
        P.Local(stride),
        P.Strided(stride),
        P.StridedColumns(stride),
        P.Fixed(stride, c),
        P.Fixed(stride, c, distinct_heads=True),
        P.FixedBlock(stride),
        P.FixedSummary(stride, c),
        P.FixedSummary(stride, c, distinct_heads=True),
        P.DilatedWindow(stride, 2),
        P.BigBird(stride, 1, 2, max(1, stride // 2)),
        P.Longformer(stride, 3),
        P.Custom(lambda i, j: (i - j < stride) | (j % (2 * stride + 1) == 0), block=4),
    ]


def informative_model(**cfg):
    """A SparseTransformer(ModelConfig(**cfg)) in eval mode, seeded, with its weights shaken (the head starts
    at zero, so unshaken logits say nothing), for comparing decoding with the full forward pass."""
    import torch

    from sparse_transformer.model import ModelConfig, SparseTransformer

    torch.manual_seed(0)
    model = SparseTransformer(ModelConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model
