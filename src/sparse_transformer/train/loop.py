"""The training loop (paper section 6): AdamW, warmup + cosine, clipping, mixed precision,
recomputation, EMA, atomic checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from ..data import get_batch, load_dataset
from ..data.compressors import cached_compressor_bits
from ..model import SparseTransformer
from ..model.generate import generate
from ..sysutil import atomic_write_text, cpu_description
from .checkpoint import CKPT_NAME, atomic_torch_save, checkpoint_config, export_weights, load_checkpoint
from . import distributed as D
from .config import RunConfig
from .evaluate import autocast_context, evaluate
from .guard import Divergence, RunLock, StopSignals, check_finite, remove_stale_temps
from .memory import check_fits, param_count, training_bytes
from .optim import EMA, lr_at, make_optimizer
from .precision import resolve as resolve_precision
from .progress import Progress


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


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when installed)."""

    def __init__(self, out_dir: Path, resume_step: int | None):
        self.path = out_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop what was logged after the checkpoint we resume from.
            kept = []
            for n, line in enumerate(self.path.read_text(errors="replace").splitlines(), 1):
                try:
                    row = json.loads(line) if line else None
                except json.JSONDecodeError:  # a line torn by a crash or a full disk
                    warnings.warn(f"{self.path}: line {n} is not JSON (torn by an interrupted write); dropped")
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(self.path, "".join(l + "\n" for l in kept))
        self.f = open(self.path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # tensorboard not installed
            self.tb = None

    def log(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.f.write(json.dumps(row, allow_nan=False) + "\n")  # strict JSON: NaN and inf become null
        self.f.flush()
        if self.tb:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb:
            self.tb.close()


def _rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def adopt_image_shape(cfg: RunConfig, shape: list[int], echo=print) -> None:
    """The data shape drives the model when model.data_shape is not given (sections 5.3, 7.1).

    Sets model.data_shape to the images' shape, model.stride to one image row
    (W * C: 96 for CIFAR-10, 28 for Fashion-MNIST) and model.n_ctx to one image,
    and says so.
    """
    H, W, C = shape
    cfg.model.data_shape = list(shape)
    cfg.model.stride = W * C
    cfg.model.n_ctx = H * W * C
    cfg.model.c = min(cfg.model.c, cfg.model.stride)
    cfg.validate()
    echo(f"image data {H}x{W}x{C}: model.data_shape={H}x{W}x{C}, model.stride={W * C} (one row), "
         f"model.n_ctx={H * W * C} (set model.data_shape yourself to choose otherwise)")


def train(cfg: RunConfig, *, resume: bool = False, show_progress: bool = True, echo=print, force: bool = False) -> dict:
    """Train as ``cfg`` says; returns a summary with the final validation bits per dim.

    Under torchrun this is one process of a data-parallel run (see
    distributed.py): every process takes its share of each global batch, and
    only rank 0 prints, logs and writes checkpoints (FSDP: every rank writes
    its shards). ``force`` skips the check that the model and its
    activations fit in the device's available memory.
    """
    cfg.validate()
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    d, device = D.setup(pick_device(t.device), t.parallel, t.dist_timeout)
    ok = False
    try:
        with RunLock(Path(t.out_dir)) if d.main else contextlib.nullcontext():
            summary = _train(cfg, d, device, resume, show_progress and d.main, echo if d.main else (lambda *_: None),
                             force)
        ok = True
        return summary
    finally:
        D.teardown(d, ok)


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


def _train(cfg: RunConfig, d: D.Dist, device: torch.device, resume: bool, show_progress: bool, echo,
           force: bool = False) -> dict:
    t = cfg.train
    out = Path(t.out_dir)
    ckpt_path = out / CKPT_NAME
    precision, precision_why = resolve_precision(t.precision, device)
    if t.batch_size % (d.world * t.grad_accum):
        raise ValueError(f"train.batch_size={t.batch_size} (global) must be divisible by the number of processes "
                         f"({d.world}) x train.grad_accum ({t.grad_accum})")
    fsdp = d.enabled and d.parallel == "fsdp"
    if fsdp and t.ema:
        raise ValueError("train.ema is not supported with train.parallel = fsdp; use ddp or set train.ema = 0")

    ds = load_dataset(cfg.data.name, cfg.data.train_fraction, cfg.data.dir)
    train_data, val_data = ds.split("train"), ds.split("val")
    whole = math.prod(ds.shape) if ds.modality == "image" and ds.shape else 0
    if ds.modality == "image" and ds.shape and not cfg.model.data_shape:
        adopt_image_shape(cfg, ds.shape, echo)
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)  # a clear error if missing or corrupt; nothing is written before
        saved = checkpoint_config(ckpt["config"], ckpt_path).to_dict()["model"]
        if saved != cfg.to_dict()["model"]:
            raise ValueError(f"the model settings differ from the checkpoint in {out}; resume with the same model.* settings")
        if fsdp and not ckpt.get("shards"):
            raise ValueError(f"{ckpt_path} was written without FSDP; resume it with train.parallel = ddp")
    elif ckpt_path.exists():
        raise ValueError(f"{ckpt_path} already exists; pass --resume to continue it or choose another --train.out_dir")
    elif (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} holds another run's log (metrics.jsonl) but no checkpoint; "
                         "choose another --train.out_dir or remove the folder")
    if d.main and out.is_dir():
        remove_stale_temps(out, echo)
    if ckpt is not None and int(ckpt["step"]) >= t.steps and (out / "summary.json").is_file():
        echo(f"{out} finished at step {ckpt['step']} (train.steps = {t.steps}): nothing to do; "
             "raise --train.steps to train on")
        return json.loads((out / "summary.json").read_text())

    micro = t.batch_size // d.world // t.grad_accum
    check_fits(training_bytes(cfg.model, micro, precision, bool(t.ema)),
               f"training this model ({param_count(cfg.model):,} parameters, {micro} x {cfg.model.n_ctx} tokens a step)",
               device, force)
    torch.manual_seed(t.seed)
    model = SparseTransformer(cfg.model).to(device)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # before wrapping: FSDP shards what it is given
    net = D.wrap(model, d, device, t.grad_reduce_dtype)  # run forward/backward through this
    if t.compile:  # training steps only; evaluation and sampling run the plain model
        net = torch.compile(net)
    opt = make_optimizer(model, t, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "float16")
    ema = EMA(model, t.ema) if t.ema else None
    start = 0
    if ckpt is not None:
        if ckpt.get("shards"):  # torch.distributed.checkpoint reshards to this run's processes
            D.fsdp_load(model, opt, out / ckpt["shards"])
        else:
            opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("ema"):
            ema.load_state_dict(ckpt["ema"])
            ema.updates = int(ckpt.get("ema_updates", 10**9))  # older checkpoints: no warm-up left
        start = int(ckpt["step"])
        _set_rng_state(ckpt["rng"], device)
    elapsed0 = float(ckpt.get("train_seconds", 0.0)) if ckpt is not None else 0.0  # time_limit spans resumes
    eval_weights = {"ema": True}  # set to False at the end when the last weights evaluate better

    log = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
        log = MetricsLog(out, start if resume else None)
    D.barrier(d)
    n_params = sum(p.numel() for p in model.parameters())
    if start == 0:
        echo(f"model: {n_params / 1e6:.2f}M parameters, {cfg.model.n_layer} layers, d {cfg.model.d_model}, "
             f"{cfg.model.pattern} ({cfg.model.combine}), context {cfg.model.n_ctx}; data {ds.name}: "
             f"{len(train_data):,} train / {len(val_data):,} val bytes; device {device}"
             + (f"; {d.world} processes ({d.parallel})" if d.enabled else ""))
        echo(f"precision {precision} ({precision_why}); attention: {model.attention_path(device, precision)}"
             + (f"; CPU {cpu_description()}" if device.type == "cpu" else ""))

    def save(step: int) -> None:
        state = {
            "format": 1,
            "scaler": scaler.state_dict() if scaler.is_enabled() else {},
            "ema": ema.state_dict() if ema else {},
            "ema_updates": ema.updates if ema else 0,
            "eval_weights": "ema" if ema and eval_weights["ema"] else "model",
            "step": step,
            "data_position": step,  # batches are a pure function of (seed, step, rank, world)
            "rng": _rng_state(device),
            "config": cfg.to_dict(),
            "modality": ds.modality,  # how `sample` writes its output: text, image or audio
            "world_size": d.world,
            "train_seconds": elapsed0 + time.perf_counter() - t0,
        }
        if fsdp:  # shards first, in a fresh folder; then ckpt.pt points to it; then older shards go
            shards = f"ckpt-shards-{step:08d}"
            if d.main:
                shutil.rmtree(out / shards, ignore_errors=True)
            D.barrier(d)
            state["model"] = D.fsdp_save(model, opt, out / shards)
            state["shards"] = shards
            D.barrier(d)
            if d.main:
                atomic_torch_save(state, ckpt_path)
                D.prune_shard_folders(out, shards)
        elif d.main:
            check_finite(model)
            state.update(model=model.state_dict(), optimizer=opt.state_dict())
            keep_previous(ckpt_path)
            atomic_torch_save(state, ckpt_path)
        D.barrier(d)

    def run_eval(step: int, use_ema: bool = True) -> dict:
        if ema and use_ema:
            ema.swap(model)
        # DDP: each process scores its share of the windows; FSDP: every process runs every window.
        share = (0, 1) if fsdp else (d.rank, d.world)
        res = evaluate(model, val_data, batch_size=max(1, t.batch_size // t.grad_accum // d.world),
                       precision=precision, max_bytes=t.eval_max_bytes, share=share,
                       reduce=None if fsdp else (lambda v: D.sum_(v, d, device)))
        if ema and use_ema:
            ema.swap(model)
        if log:
            log.log({"step": step, "val_bpb": res["bits_per_dim"], "val_bytes": res["bytes"],
                     **({"weights": "ema" if use_ema else "last"} if ema else {})})
        return res

    tokens_per_step = t.batch_size * cfg.model.n_ctx
    bar = Progress(steps=t.steps, start=start, time_limit=t.time_limit, by_time=t.schedule == "time",
                   enabled=show_progress)
    t0 = time.perf_counter()
    last_log, last_step, step = t0, start, start
    elapsed = elapsed0  # training seconds so far; the same on every process
    timed = bool(t.time_limit)
    losses = []
    guard = Divergence(t.max_nonfinite)
    model.train()
    with StopSignals() as signals:
        try:
            for step in range(start, t.steps):
                lr = lr_at(step, t, elapsed)
                for group in opt.param_groups:
                    group["lr"] = lr
                loss_sum = 0.0
                for micro in range(t.grad_accum):
                    x = get_batch(train_data, cfg.model.n_ctx, t.seed, step, t.batch_size, rank=d.rank, world=d.world,
                                  micro=micro, n_micro=t.grad_accum, whole_examples=whole).to(device, non_blocking=True)
                    with D.sync_gradients(net, d, micro == t.grad_accum - 1):
                        with autocast_context(device, precision):
                            _, loss = net(x, targets=x)  # the model predicts its own input, shifted by the start token
                            loss = loss / t.grad_accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.item()
                # One all-reduce: the global batch's loss, and whether any process was asked to stop.
                loss_sum, stop = D.sum_([loss_sum, float(signals.received is not None)], d, device)
                loss_sum /= d.world
                scaler.unscale_(opt)
                gnorm = D.grad_norm_value(torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip))
                # float16: the scaler skips overflowed steps itself; otherwise a non-finite step is skipped here
                if scaler.is_enabled() or guard.step_ok(loss_sum, gnorm, step + 1, echo):
                    scaler.step(opt)
                    scaler.update()
                    if ema:
                        ema.update(model)
                opt.zero_grad(set_to_none=True)
                losses.append(loss_sum)
                done = step + 1
                if log and (done % t.log_every == 0 or done == t.steps):
                    now = time.perf_counter()
                    tok_s = (done - last_step) * tokens_per_step / max(now - last_log, 1e-9)
                    last_log, last_step = now, done
                    row = {"step": done, "loss": loss_sum, "bpb": loss_sum / math.log(2), "lr": lr,
                           "grad_norm": gnorm, "tok_s": tok_s, "time": now - t0}
                    log.log(row)
                    bar.update(done, loss_sum, tok_s, elapsed)
                else:
                    bar.update(done, elapsed=elapsed)
                if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                    res = run_eval(done)
                    echo(f"step {done}: val {res['bits_per_dim']:.4f} bits/dim")
                if t.ckpt_every and done % t.ckpt_every == 0:
                    save(done)
                if timed:  # every process sees the same time: the same learning rate and the same last step
                    elapsed = D.mean(elapsed0 + time.perf_counter() - t0, d, device)
                    if elapsed >= t.time_limit:
                        echo(f"time limit of {t.time_limit:.0f} s reached at step {done}")
                        break
                if t.stop_at and done >= t.stop_at:
                    echo(f"stopping at step {done} (train.stop_at); continue with --resume")
                    break
                if stop > 0:  # every process agrees on the step
                    save(done)
                    raise signals.stopped(done)
        finally:
            bar.close()
    train_time = time.perf_counter() - t0
    final_step = step + 1 if t.steps > start else start
    save(final_step)
    res = run_eval(final_step)
    if ema:  # the average must never report worse than the weights it averages (a short run's early weights)
        last = run_eval(final_step, use_ema=False)
        echo(f"validation: EMA weights {res['bits_per_dim']:.4f}, last weights {last['bits_per_dim']:.4f} bits per dim")
        if last["bits_per_dim"] < res["bits_per_dim"]:
            echo("the last weights are better: they are the ones evaluated, exported and sampled")
            res, eval_weights["ema"] = last, False
            save(final_step)
    use_ema = bool(ema) and eval_weights["ema"]
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        eval_state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        eval_state = ema.state_dict() if use_ema else model.state_dict()
    if d.main:
        export_weights({k: v for k, v in eval_state.items()}, cfg.to_dict(), out, ds.modality, final_step, use_ema)
    summary = {
        "steps": final_step, "train_seconds": train_time, "val_bits_per_dim": res["bits_per_dim"],
        "val_bytes": res["bytes"], "parameters": n_params, "out_dir": str(out),
        "last_train_loss": losses[-1] if losses else None,
    }
    echo(f"validation: {res['bits_per_dim']:.4f} bits per byte over {res['bytes']:,} bytes "
         f"after {final_step} steps ({train_time:.0f} s); checkpoint {ckpt_path}")
    if ds.modality in ("text", "audio") and d.main:  # what the figure is worth: general compressors, same bytes
        floor = cached_compressor_bits(val_data[: res["bytes"]], ds.root)
        summary["compressors"] = floor
        echo(f"the same validation bytes: bzip2 -9 {floor['bz2']:.3f}, xz -9 {floor['xz']:.3f} bits per byte "
             f"(the model: {res['bits_per_dim']:.3f}, "
             f"{'better' if res['bits_per_dim'] < min(floor['bz2'], floor['xz']) else 'not better'} than both)")
    if ds.modality == "text" and t.sample_bytes and d.main and not fsdp:
        if use_ema:
            ema.swap(model)
        n = min(t.sample_bytes, cfg.model.n_ctx - 1)
        sample = generate(model, 1, n, prompt=b"\n", seed=t.seed)[0, 1:].tolist()
        if use_ema:
            ema.swap(model)
        text = bytes(sample).decode("utf-8", errors="replace")
        summary["sample"] = text
        echo("sample:\n" + text)
    if d.main:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        log.close()
    return summary
