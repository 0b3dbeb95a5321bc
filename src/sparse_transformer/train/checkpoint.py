"""Checkpoints: atomic writes, tensors and plain types only, safetensors export."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..sysutil import atomic_open, atomic_write_text

if TYPE_CHECKING:
    from .config import RunConfig

CKPT_NAME = "ckpt.pt"


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save through a temporary file, fsync and rename: never a half file."""
    with atomic_open(path) as f:
        torch.save(obj, f)


def keep_previous(ckpt_path: Path) -> None:
    """ckpt.pt becomes ckpt-prev.pt (a hard link, else a copy) before a new ckpt.pt replaces it."""
    if not ckpt_path.exists():
        return
    prev, tmp = ckpt_path.with_name("ckpt-prev.pt"), ckpt_path.with_name(".ckpt-prev.pt.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(ckpt_path, tmp)
    except OSError:
        shutil.copyfile(ckpt_path, tmp)
    os.replace(tmp, prev)


def resolve(path: str | Path) -> Path:
    """A checkpoint file, or a run folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / CKPT_NAME
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    return p


def _starts_as_zip(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load with weights_only=True; a corrupt or truncated file is a ValueError."""
    p = resolve(path)
    try:
        with warnings.catch_warnings():  # a foreign pickle's protocol warning would precede the one-line error
            warnings.simplefilter("ignore", UserWarning)
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # on arbitrary bytes the weights-only unpickler fails in many ways (IndexError, ...)
        if isinstance(e, pickle.UnpicklingError) or not _starts_as_zip(p):
            # torch.save writes a zip archive: anything else is not a checkpoint of ours, whatever it failed with
            raise ValueError(f"{p} is not a sparse-transformer checkpoint (not a torch file of tensors and "
                             "plain types; it is not loaded, since unpickling it could run code)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {p} is corrupt or truncated ({first})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{p} is not a sparse-transformer checkpoint")
    return ckpt


def export_weights(state: dict[str, torch.Tensor], config: dict, out_dir: Path, modality: str = "",
                   step: int | None = None, ema: bool = False) -> None:
    """model.safetensors (its metadata: modality, step, weights "ema" or "last") + config.json, both atomic."""
    from safetensors.torch import save

    from ..sysutil import atomic_write_bytes

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"modality": modality, "weights": "ema" if ema else "last", **({"step": str(step)} if step is not None else {})}
    atomic_write_bytes(out_dir / "model.safetensors", save(tensors, metadata=meta))
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")


def eval_state(ckpt: dict) -> dict:
    """The weights a checkpoint is evaluated, sampled and drawn with: the EMA average when the run kept
    one and it evaluated no worse than the last weights at the end of the run, else the last weights."""
    if ckpt.get("ema") and ckpt.get("eval_weights", "ema") == "ema":
        return ckpt["ema"]
    return ckpt["model"]


@dataclass
class Run:
    """A trained model ready to evaluate or sample, as ``load_run`` returns it."""

    model: torch.nn.Module
    config: RunConfig
    modality: str  # text, image or audio
    step: int | None  # None when the weights file does not say
    ema: bool  # whether the weights are the EMA average
    path: Path  # the file the weights came from


def checkpoint_config(config, p: Path) -> RunConfig:
    """The RunConfig a checkpoint (or config.json) stores, validated; a ValueError naming ``p`` otherwise."""
    from .config import RunConfig

    if not isinstance(config, dict):
        raise ValueError(f"{p}: its config is a {type(config).__name__}, not a table of settings")
    try:
        cfg = RunConfig.from_dict(config)
        cfg.validate()
    except (ValueError, TypeError, AttributeError, KeyError) as e:
        raise ValueError(f"{p}: invalid config ({e})") from None
    return cfg


def _weights_file(path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir():
        for name in (CKPT_NAME, "model.safetensors"):
            if (p / name).is_file():
                return p / name
        raise ValueError(f"{p} holds neither {CKPT_NAME} nor model.safetensors: not a sparse-transformer run")
    if not p.is_file():
        raise ValueError(f"checkpoint not found: {p}")
    return p


def _read_safetensors(p: Path) -> tuple[dict, dict, dict]:
    """(tensors, metadata, config dict) of an exported model.safetensors and the config.json beside it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    cfg_path = p.with_name("config.json")
    try:
        config = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{p} needs the config.json its run wrote beside it; {cfg_path} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    return tensors, meta, config


def load_run(path: str | Path, device: torch.device | str = "cpu", force: bool = False) -> Run:
    """The model of a run, with the weights it is evaluated with (``eval_state``), in eval mode.

    ``path`` is a run folder, its ``ckpt.pt``, or its exported ``model.safetensors`` (with
    ``config.json`` beside it). Anything else (random bytes, a pickle, another program's torch
    file, a config that is not a table, weights of the wrong shapes, a model too large for the
    device's memory unless ``force``) is one ValueError naming the file.
    """
    from ..model import SparseTransformer
    from .memory import check_fits, inference_bytes

    p = _weights_file(path)
    if p.suffix == ".safetensors":
        state, meta, config = _read_safetensors(p)
        modality, step, ema = meta.get("modality", ""), meta.get("step"), meta.get("weights") == "ema"
        step = int(step) if step and step.isdigit() else None
    else:
        ckpt = load_checkpoint(p)
        config, state = ckpt["config"], eval_state(ckpt)
        modality, step, ema = ckpt.get("modality", ""), ckpt.get("step"), state is ckpt.get("ema")
    cfg = checkpoint_config(config, p)
    device = torch.device(device)
    check_fits(inference_bytes(cfg.model), f"the model of {p}", device, force)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{p}: its weights are not a table of tensors")
    model = SparseTransformer(cfg.model)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [type(e).__name__]
        raise ValueError(f"{p}: the weights do not match its config ({detail[0]})") from None
    if not modality:
        modality = "image" if len(cfg.model.data_shape) == 3 else "text"
    return Run(model.to(device).eval(), cfg, modality, step, bool(ema), p)
