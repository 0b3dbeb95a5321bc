"""``train(cfg)``: one run of the Trainer (trainer.py) on this process, in its locked run folder."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from . import distributed as dist
from .config import RunConfig
from .guard import RunLock, Stopped
from .trainer import Trainer


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device is {name!r} but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu, cuda or cuda:N, got {name!r}")
    return dev


def train(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True, echo=print, force: bool = False) -> dict:
    """Train as ``cfg`` says; returns a summary with the final validation bits per dim.

    Under torchrun this is one process of a data-parallel run (see
    distributed.py): every process takes its share of each global batch, and
    only rank 0 prints, logs and writes checkpoints (FSDP: every rank writes
    its shards). ``force`` skips the check that the model and its
    activations fit in the device's available memory.
    """
    cfg.validate()
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    ws, device = dist.setup(pick_device(cfg.train.device), cfg.train.parallel, cfg.train.dist_timeout)
    ok = False
    try:
        with RunLock(Path(cfg.train.out_dir)) if ws.main else contextlib.nullcontext():
            summary = Trainer(cfg, ws, device, resume=resume, show_progress=show_progress, echo=echo,
                              force=force).train()
        ok = True
        return summary
    except Stopped:
        # A stop every process agreed on (the request rides on the loss all-reduce): rank 0 may still
        # be writing the checkpoint, so leave together, as after a normal end.
        ok = True
        raise
    finally:
        dist.teardown(ws, ok)
