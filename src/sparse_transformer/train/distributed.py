"""Everything that knows about torch.distributed, in one place.

Launch with ``torchrun`` (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
without it training runs in one process and nothing here does anything.

- Data parallel: DistributedDataParallel. Gradients are all-reduced once per
  optimizer step (``no_sync`` on all but the last micro-batch), optionally in
  bfloat16 or float16 (the paper all-reduced in float16) via DDP's comm hooks.
- Sharded: FSDP2 (``fully_shard`` per residual block, then the root), for
  models that do not fit one device; checkpoints through
  torch.distributed.checkpoint, which reshards to any number of processes.
- Backends: NCCL on CUDA, gloo on the CPU. Collectives time out after
  ``train.dist_timeout`` seconds, so a hung or dead peer ends the run with an
  error instead of a hang.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class DistributedFailure(RuntimeError):
    """Another process of the run died or stopped answering."""


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def setup(device: torch.device, parallel: str, timeout_s: float) -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes (if any); returns this process's Dist and device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(), device
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return Dist(rank, world, local, parallel), device


def teardown(ws: Dist, ok: bool) -> None:
    """Leave the process group; after a normal end, wait for every process first (gloo aborts a
    process whose peer tears down mid-exchange)."""
    if ws.enabled and dist.is_initialized():
        if ok:
            barrier(ws)
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, ws: Dist, device: torch.device, reduce_dtype: str) -> torch.nn.Module:
    """The module to run forward and backward through: DDP, FSDP2 (in place), or the model itself."""
    if not ws.enabled:
        return model
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[reduce_dtype]
    if ws.parallel == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(reduce_dtype=dtype) if dtype else MixedPrecisionPolicy()
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    if dtype is torch.bfloat16 and device.type != "cuda":
        raise ValueError("train.grad_reduce_dtype = bfloat16 needs NCCL (CUDA devices); with gloo use float16 or float32")
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if dtype is torch.bfloat16:
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif dtype is torch.float16:
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    return ddp


@contextlib.contextmanager
def sync_gradients(net: torch.nn.Module, ws: Dist, sync: bool):
    """All-reduce gradients in this backward only when ``sync`` (the last micro-batch of a step)."""
    if not ws.enabled or sync:
        if ws.parallel == "fsdp":
            net.set_requires_gradient_sync(True)
        yield
    elif ws.parallel == "fsdp":
        net.set_requires_gradient_sync(False)
        yield
    else:
        with net.no_sync():
            yield


def _collective(fn):
    try:
        return fn()
    except (RuntimeError, dist.DistBackendError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedFailure(f"lost contact with another process of the run ({first[:200]})") from None


def mean(value: float, ws: Dist, device: torch.device) -> float:
    """The mean of ``value`` over all processes (every process gets it)."""
    if not ws.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    _collective(lambda: dist.all_reduce(t))
    return t.item() / ws.world


def sum_(values: list[float], ws: Dist, device: torch.device) -> list[float]:
    if not ws.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    _collective(lambda: dist.all_reduce(t))
    return t.tolist()


def barrier(ws: Dist) -> None:
    if ws.enabled:
        _collective(dist.barrier)


def grad_norm_value(norm) -> float:
    full = getattr(norm, "full_tensor", None)  # FSDP2 returns a DTensor
    return float((full() if full else norm).item())


# ----------------------------------------------------------------------------- FSDP checkpoints
def fsdp_save(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> dict:
    """Save the sharded model and optimizer with torch.distributed.checkpoint into ``folder`` (a fresh
    folder; every rank writes its shards); returns the full model state on rank 0 (empty elsewhere)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    msd, osd = get_state_dict(model, opt)
    _collective(lambda: dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder)))
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def fsdp_load(model: torch.nn.Module, opt: torch.optim.Optimizer, folder: Path) -> None:
    """Load a torch.distributed.checkpoint folder saved by any number of processes."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    _collective(lambda: dcp.load(state, checkpoint_id=str(folder)))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])


def prune_shard_folders(out: Path, keep: str) -> None:
    """Remove sharded checkpoint folders other than ``keep`` (after ckpt.pt points to ``keep``)."""
    for p in out.glob("ckpt-shards-*"):
        if p.name != keep:
            shutil.rmtree(p, ignore_errors=True)
