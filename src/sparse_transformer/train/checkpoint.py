"""Checkpoints: atomic writes, tensors and plain types only, safetensors export."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

from ..sysutil import atomic_open, atomic_write_text

CKPT_NAME = "ckpt.pt"


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file, fsync and rename: never a half file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_NAME
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    return p


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True; a corrupt or truncated file is a ValueError."""
    p = resolve(path)
    try:
        ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {p} is corrupt or truncated ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not a sparse-transformer checkpoint")
    return ckpt


def export_weights(state: dict[str, torch.Tensor], config: dict, out_dir: Path) -> None:
    """model.safetensors + config.json, both written atomically."""
    from safetensors.torch import save

    from ..sysutil import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write_bytes(out_dir / "model.safetensors", save(tensors))
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")


def eval_state(ckpt: dict) -> dict:
    """The weights a checkpoint is evaluated, sampled and drawn with: the EMA average when the run kept
    one and it evaluated no worse than the last weights at the end of the run, else the last weights."""
    if ckpt.get("ema") and ckpt.get("eval_weights", "ema") == "ema":
        return ckpt["ema"]
    return ckpt["model"]
