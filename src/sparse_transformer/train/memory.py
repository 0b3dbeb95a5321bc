"""Will it fit? An estimate of a model's memory before anything is allocated.

A config such as ``model.n_layer = 1000000`` would otherwise grow for minutes
until the machine swaps or the kernel kills the process. ``check_fits``
compares an estimate with the memory the device has available and refuses,
with one line, what cannot fit; ``--force`` (``force=True``) skips the check.
The parameter count is exact (the model is built on the meta device, which
allocates nothing); the activation figure is an estimate of what backward
keeps, per token and layer.
"""
from __future__ import annotations

import os

import torch

from ..model import SparseTransformer
from ..model.config import ModelConfig
from ..sysutil import proc_kib


def param_count(cfg: ModelConfig) -> int:
    """The exact number of parameters, from one- and two-layer models built on the meta device."""
    import dataclasses

    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            m = SparseTransformer(dataclasses.replace(cfg, n_layer=layers))
        counts.append(sum(p.numel() for p in m.parameters()))
    per_layer = counts[1] - counts[0]
    return counts[0] + (cfg.n_layer - 1) * per_layer


def activation_bytes(cfg: ModelConfig, batch: int, element: int) -> int:
    """What backward keeps for ``batch`` sequences: per token and layer about 8 d_model + 2 d_qk
    + 2 d_ff values (layer norms, q/k/v, attention output, residuals, the feed-forward's hidden
    layer before and after GELU); with ``recompute`` one layer's worth plus each layer's input.
    The logits are kept in float32 about four times (logits, their float copy, log-softmax, gradient)."""
    tokens = batch * cfg.n_ctx
    per_layer = 8 * cfg.d_model + 2 * cfg.d_qk + 2 * cfg.d_ff
    layers = (cfg.n_layer * cfg.d_model + per_layer) if cfg.recompute else cfg.n_layer * per_layer
    return tokens * layers * element + tokens * cfg.vocab_size * 4 * 4


def available_bytes(device: torch.device) -> int | None:
    """Free memory of ``device`` (CUDA: free device memory; CPU: MemAvailable), or None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    avail = proc_kib("/proc/meminfo", "MemAvailable")
    if avail is not None:
        return avail * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def training_bytes(cfg: ModelConfig, batch: int, precision: str, ema: bool) -> int:
    """Parameters, gradients and AdamW's two moments (and the EMA copy) in float32, plus activations."""
    per_param = 4 * (4 + (1 if ema else 0))
    element = 2 if precision in ("bfloat16", "float16") else 4
    return param_count(cfg) * per_param + activation_bytes(cfg, batch, element)


def inference_bytes(cfg: ModelConfig) -> int:
    """The weights in float32 and the checkpoint's copy of them while it loads."""
    return param_count(cfg) * 4 * 2


def check_fits(need: int, what: str, device: torch.device, force: bool = False) -> None:
    """A ValueError if ``need`` bytes exceed what ``device`` has available (unless ``force``)."""
    if force:
        return
    have = available_bytes(device)
    if have is not None and need > have:
        raise ValueError(
            f"{what} needs about {need / 2**30:.1f} GiB, more than the {have / 2**30:.1f} GiB available on {device}; "
            "make the model or the batch smaller, or pass --force to try anyway"
        )
