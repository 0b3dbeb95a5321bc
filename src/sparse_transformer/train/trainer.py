"""The Trainer (paper section 6): setup -> train_step -> evaluate -> save -> finish.

``Trainer.train`` is the loop, read top to bottom: learning rate, one step
(forward, backward, clipping, AdamW, EMA), logging, periodic evaluation and
checkpoints, the time budget, and a stop request from a signal. What surrounds
it lives in one place each: torch.distributed in ``distributed.py`` (imported
as ``dist``), the divergence guard, signals and the run lock in ``guard.py``,
the schedule and the EMA in ``optim.py``, the metrics file in ``metrics.py``.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..data import get_batch, load_dataset
from ..data.compressors import cached_compressor_bits
from ..model import SparseTransformer
from ..model.generate import generate
from ..sysutil import atomic_write_text, cpu_description, make_dirs
from . import distributed as dist
from .checkpoint import CKPT_NAME, atomic_torch_save, checkpoint_config, export_weights, keep_previous, load_checkpoint
from .config import RunConfig, resolve
from .evaluate import autocast_context, evaluate, evaluate_dynamic
from .guard import Divergence, StopSignals, check_finite, remove_stale_temps
from .memory import check_fits, param_count, training_bytes
from .metrics import MetricsLog
from .optim import EMA, lr_at, make_optimizer
from .precision import resolve as resolve_precision
from .progress import Progress


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class Trainer:
    """One training run of ``cfg`` on this process (one of ``ws.world`` under torchrun)."""

    def __init__(self, cfg: RunConfig, ws: dist.Dist, device: torch.device, *, resume: bool = False,
                 show_progress: bool = True, echo=print, force: bool = False):
        self.ws, self.device, self.resume, self.force = ws, device, resume, force
        self.echo = echo if ws.main else (lambda *_: None)
        self.show_progress = show_progress and ws.main
        self.out = Path(cfg.train.out_dir)
        self.ckpt_path = self.out / CKPT_NAME
        self.fsdp = ws.enabled and ws.parallel == "fsdp"
        self.cfg = cfg
        self.finished: dict | None = None  # the summary of a run that had already finished
        self.setup()

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Settings, data, the checkpoint to resume, the memory check, then model, optimizer and log."""
        t, ws = self.cfg.train, self.ws
        self.precision, self.precision_why = resolve_precision(t.precision, self.device)
        if t.batch_size % (ws.world * t.grad_accum):
            raise ValueError(f"train.batch_size={t.batch_size} (global) must be divisible by the number of processes "
                             f"({ws.world}) x train.grad_accum ({t.grad_accum})")
        if self.fsdp and t.ema:
            raise ValueError("train.ema is not supported with train.parallel = fsdp; use ddp or set train.ema = 0")
        self.data = load_dataset(self.cfg.data.name, self.cfg.data.train_fraction, self.cfg.data.dir)
        self.cfg, note = resolve(self.cfg, self.data)
        if note:
            self.echo(note)
        self.train_data, self.val_data = self.data.split("train"), self.data.split("val")
        ckpt = self._checkpoint_to_resume()
        if ckpt is not None and int(ckpt["step"]) >= t.steps and (self.out / "summary.json").is_file():
            self.echo(f"{self.out} finished at step {ckpt['step']} (train.steps = {t.steps}): nothing to do; "
                      "raise --train.steps to train on")
            self.finished = json.loads((self.out / "summary.json").read_text())
            return
        self.micro = t.batch_size // ws.world // t.grad_accum  # sequences per forward on this process
        check_fits(training_bytes(self.cfg.model, self.micro, self.precision, bool(t.ema)),
                   f"training this model ({param_count(self.cfg.model):,} parameters, "
                   f"{self.micro} x {self.cfg.model.n_ctx} tokens a step)", self.device, self.force)
        self._build(ckpt)
        self.log = None
        if ws.main:
            make_dirs(self.out)
            atomic_write_text(self.out / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            self.log = MetricsLog(self.out, self.start if self.resume else None)
        dist.barrier(ws)
        if self.start == 0:
            self._header()

    def _checkpoint_to_resume(self) -> dict | None:
        """The checkpoint ``--resume`` continues (checked against the settings), or None for a fresh run
        (which refuses a folder holding another run)."""
        out, path = self.out, self.ckpt_path
        ckpt = None
        if self.resume:
            ckpt = load_checkpoint(path)  # a clear error if missing or corrupt; nothing is written before
            if checkpoint_config(ckpt["config"], path).to_dict()["model"] != self.cfg.to_dict()["model"]:
                raise ValueError(f"the model settings differ from the checkpoint in {out}; "
                                 "resume with the same model.* settings")
            if self.fsdp and not ckpt.get("shards"):
                raise ValueError(f"{path} was written without FSDP; resume it with train.parallel = ddp")
        elif path.exists():
            raise ValueError(f"{path} already exists; pass --resume to continue it or choose another --train.out_dir")
        elif (out / "metrics.jsonl").exists():
            raise ValueError(f"{out} holds another run's log (metrics.jsonl) but no checkpoint; "
                             "choose another --train.out_dir or remove the folder")
        if self.ws.main and out.is_dir():
            remove_stale_temps(out, self.echo)
        return ckpt

    def _build(self, ckpt: dict | None) -> None:
        """Model, its wrapper for training, optimizer, loss scaler and EMA; restored from ``ckpt`` if given."""
        t, device = self.cfg.train, self.device
        torch.manual_seed(t.seed)
        self.model = SparseTransformer(self.cfg.model).to(device)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])  # before wrapping: FSDP shards what it is given
        self.net = dist.wrap(self.model, self.ws, device, t.grad_reduce_dtype)  # forward/backward run through this
        if t.compile:  # training steps only; evaluation and sampling run the plain model
            self.net = torch.compile(self.net)
        self.opt = make_optimizer(self.model, t, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "float16")
        self.ema = EMA(self.model, t.ema) if t.ema else None
        self.eval_with_ema = self.ema is not None  # False at the end if the last weights evaluate better
        self.start, self.seconds_before = 0, 0.0  # seconds trained before this process: time_limit spans resumes
        if ckpt is None:
            return
        if ckpt.get("shards"):  # torch.distributed.checkpoint reshards to this run's processes
            dist.fsdp_load(self.model, self.opt, self.out / ckpt["shards"])
        else:
            self.opt.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema"):
            self.ema.load_state_dict(ckpt["ema"])
            self.ema.updates = int(ckpt.get("ema_updates", 10**9))  # older checkpoints: no warm-up left
        self.start = int(ckpt["step"])
        self.seconds_before = float(ckpt.get("train_seconds", 0.0))
        set_rng_state(ckpt["rng"], device)

    def _header(self) -> None:
        m, ws = self.cfg.model, self.ws
        self.echo(f"model: {param_count(m) / 1e6:.2f}M parameters, {m.n_layer} layers, d {m.d_model}, "
                  f"{m.pattern} ({m.combine}), context {m.n_ctx}; data {self.data.name}: "
                  f"{len(self.train_data):,} train / {len(self.val_data):,} val bytes; device {self.device}"
                  + (f"; {ws.world} processes ({ws.parallel})" if ws.enabled else ""))
        self.echo(f"precision {self.precision} ({self.precision_why}); "
                  f"attention: {self.model.attention_path(self.device, self.precision)}"
                  + (f"; CPU {cpu_description()}" if self.device.type == "cpu" else ""))

    # ------------------------------------------------------------------- loop
    def train(self) -> dict:
        """The loop of section 6; returns the summary (also written to summary.json)."""
        if self.finished is not None:
            return self.finished
        t = self.cfg.train
        tokens_per_step = t.batch_size * self.cfg.model.n_ctx
        bar = Progress(steps=t.steps, start=self.start, time_limit=t.time_limit, by_time=t.schedule == "time",
                       enabled=self.show_progress)
        self.t0 = time.perf_counter()
        last_log, last_step, step = self.t0, self.start, self.start
        elapsed = self.seconds_before  # training seconds so far; the same on every process
        guard, self.losses = Divergence(t.max_nonfinite), []
        self.model.train()
        with StopSignals() as signals:
            try:
                for step in range(self.start, t.steps):
                    lr = lr_at(step, t, elapsed)
                    loss, gnorm, stop = self.train_step(step, lr, guard, signals)
                    done = step + 1
                    if self.log and (done % t.log_every == 0 or done == t.steps):
                        now = time.perf_counter()
                        tok_s = (done - last_step) * tokens_per_step / max(now - last_log, 1e-9)
                        last_log, last_step = now, done
                        self.log.log({"step": done, "loss": loss, "bpb": loss / math.log(2), "lr": lr,
                                      "grad_norm": gnorm, "tok_s": tok_s, "time": now - self.t0})
                        bar.update(done, loss, tok_s, elapsed)
                    else:
                        bar.update(done, elapsed=elapsed)
                    if t.eval_every and done % t.eval_every == 0 and done != t.steps:
                        self.echo(f"step {done}: val {self.evaluate(done)['bits_per_dim']:.4f} bits/dim")
                    if t.ckpt_every and done % t.ckpt_every == 0:
                        self.save(done)
                    if t.time_limit:  # every process sees the same time: the same learning rate and last step
                        elapsed = dist.mean(self.seconds_before + time.perf_counter() - self.t0, self.ws, self.device)
                        if elapsed >= t.time_limit:
                            self.echo(f"time limit of {t.time_limit:.0f} s reached at step {done}")
                            break
                    if t.stop_at and done >= t.stop_at:
                        self.echo(f"stopping at step {done} (train.stop_at); continue with --resume")
                        break
                    if stop:  # every process agrees on the step
                        self.save(done)
                        raise signals.stopped(done)
            finally:
                bar.close()
        train_time = time.perf_counter() - self.t0
        return self.finish(step + 1 if t.steps > self.start else self.start, train_time)

    def train_step(self, step: int, lr: float, guard: Divergence, signals: StopSignals) -> tuple[float, float, bool]:
        """One optimizer step over the global batch: (its mean loss, the gradient norm, whether any process
        was asked to stop). A step with a non-finite loss or gradient is skipped (``guard``)."""
        t, ws = self.cfg.train, self.ws
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(t.grad_accum):
            x = get_batch(self.train_data, self.cfg.model.n_ctx, t.seed, step, t.batch_size, rank=ws.rank,
                          world=ws.world, micro=micro, n_micro=t.grad_accum,
                          whole_examples=self.whole_examples).to(self.device, non_blocking=True)
            with dist.sync_gradients(self.net, ws, micro == t.grad_accum - 1):
                with autocast_context(self.device, self.precision):
                    _, loss = self.net(x, targets=x)  # the model predicts its own input, shifted by the start token
                    loss = loss / t.grad_accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.item()
        # One all-reduce: the global batch's loss, and whether any process was asked to stop.
        loss_sum, stop = dist.sum_([loss_sum, float(signals.received is not None)], ws, self.device)
        loss_sum /= ws.world
        self.scaler.unscale_(self.opt)
        gnorm = dist.grad_norm_value(torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip))
        # float16: the scaler skips overflowed steps itself; otherwise a non-finite step is skipped here
        if self.scaler.is_enabled() or guard.step_ok(loss_sum, gnorm, step + 1, self.echo):
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema:
                self.ema.update(self.model)
        self.opt.zero_grad(set_to_none=True)
        self.losses.append(loss_sum)
        return loss_sum, gnorm, stop > 0

    @property
    def whole_examples(self) -> int:
        """Image data: batches start at whole images (the bytes of one image), else 0."""
        ds = self.data
        return math.prod(ds.shape) if ds.modality == "image" and ds.shape else 0

    # ------------------------------------------------------- evaluate and save
    def evaluate(self, step: int, use_ema: bool = True) -> dict:
        """Validation bits per dim (with the EMA weights when there are some and ``use_ema``), logged."""
        t, ws, swap = self.cfg.train, self.ws, bool(self.ema) and use_ema
        if swap:
            self.ema.swap(self.model)
        # DDP: each process scores its share of the windows; FSDP: every process runs every window.
        res = evaluate(self.model, self.val_data, batch_size=max(1, self.micro), precision=self.precision,
                       max_bytes=t.eval_max_bytes, share=(0, 1) if self.fsdp else (ws.rank, ws.world),
                       reduce=None if self.fsdp else (lambda v: dist.sum_(v, ws, self.device)))
        if swap:
            self.ema.swap(self.model)
        if self.log:
            self.log.log({"step": step, "val_bpb": res["bits_per_dim"], "val_bytes": res["bytes"],
                          **({"weights": "ema" if use_ema else "last"} if self.ema else {})})
        return res

    def save(self, step: int) -> None:
        """ckpt.pt, atomically, after ckpt-prev.pt keeps the previous one; never with non-finite weights.
        FSDP: the shards first, in a fresh folder; then ckpt.pt points to them; then older shards go."""
        ema, ws = self.ema, self.ws
        state = {
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "ema": ema.state_dict() if ema else {},
            "ema_updates": ema.updates if ema else 0,
            "eval_weights": "ema" if ema and self.eval_with_ema else "model",
            "step": step,  # batches are a pure function of (seed, step, rank, world): this is the data position
            "rng": rng_state(self.device),
            "config": self.cfg.to_dict(),
            "modality": self.data.modality,  # how `sample` writes its output: text, image or audio
            "world_size": ws.world,
            "train_seconds": self.seconds_before + time.perf_counter() - self.t0,
        }
        if self.fsdp:
            shards = f"ckpt-shards-{step:08d}"
            if ws.main:
                import shutil

                shutil.rmtree(self.out / shards, ignore_errors=True)
            dist.barrier(ws)
            state["model"] = dist.fsdp_save(self.model, self.opt, self.out / shards)
            state["shards"] = shards
            dist.barrier(ws)
            if ws.main:
                atomic_torch_save(state, self.ckpt_path)
                dist.prune_shard_folders(self.out, shards)
        elif ws.main:
            check_finite(self.model)
            state.update(model=self.model.state_dict(), optimizer=self.opt.state_dict())
            keep_previous(self.ckpt_path)
            atomic_torch_save(state, self.ckpt_path)
        dist.barrier(ws)

    # ------------------------------------------------------------------ finish
    def finish(self, final_step: int, train_time: float) -> dict:
        """The last checkpoint, the final evaluation (EMA against the last weights), the exported weights,
        the compressors' figures and a sample; writes summary.json."""
        self.save(final_step)
        res = self.evaluate(final_step)
        if self.ema:  # the average must never report worse than the weights it averages (a short run's early weights)
            last = self.evaluate(final_step, use_ema=False)
            self.echo(f"validation: EMA weights {res['bits_per_dim']:.4f}, last weights {last['bits_per_dim']:.4f} bits per dim")
            if last["bits_per_dim"] < res["bits_per_dim"]:
                self.echo("the last weights are better: they are the ones evaluated, exported and sampled")
                res, self.eval_with_ema = last, False
                self.save(final_step)
        self._export(final_step)
        summary = {
            "steps": final_step, "train_seconds": train_time, "val_bits_per_dim": res["bits_per_dim"],
            "val_bytes": res["bytes"], "parameters": param_count(self.cfg.model), "out_dir": str(self.out),
            "last_train_loss": self.losses[-1] if self.losses else None,
        }
        unit = "bits per byte" if self.data.modality == "text" else "bits per dim"  # images: subpixels; audio: samples
        self.echo(f"validation: {res['bits_per_dim']:.4f} {unit} over {res['bytes']:,} bytes "
                  f"after {final_step} steps ({train_time:.0f} s); checkpoint {self.ckpt_path}")
        if self.data.modality in ("text", "audio") and self.ws.main:  # what the figure is worth
            floor = cached_compressor_bits(self.val_data[: res["bytes"]], self.data.root)
            summary["compressors"] = floor
            self.echo(f"the same validation bytes: bzip2 -9 {floor['bz2']:.3f}, xz -9 {floor['xz']:.3f} {unit} "
                      f"(the model: {res['bits_per_dim']:.3f}, "
                      f"{'better' if res['bits_per_dim'] < min(floor['bz2'], floor['xz']) else 'not better'} than both)")
            if self.cfg.train.dynamic_eval_lr:
                summary.update(self._evaluate_dynamic(final_step, floor, unit))
        if self.data.modality == "text" and self.cfg.train.sample_bytes and self.ws.main and not self.fsdp:
            summary["sample"] = self._sample()
            self.echo("sample:\n" + summary["sample"])
        if self.ws.main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            self.log.close()
        return summary

    def _evaluate_dynamic(self, step: int, floor: dict, unit: str) -> dict:
        """The validation bytes scored once more with dynamic evaluation (``train.dynamic_eval_lr``), from
        the weights the run is evaluated with; on rank 0 alone, since the adaptation is sequential."""
        lr = self.cfg.train.dynamic_eval_lr
        if self.fsdp:
            self.echo("dynamic evaluation skipped: it needs the whole model in one process (train.parallel = fsdp)")
            return {}
        swap = bool(self.ema) and self.eval_with_ema
        if swap:
            self.ema.swap(self.model)
        try:
            dyn = evaluate_dynamic(self.model, self.val_data, lr=lr, grad_clip=self.cfg.train.grad_clip,
                                   precision=self.precision, max_bytes=self.cfg.train.eval_max_bytes)
        finally:
            if swap:
                self.ema.swap(self.model)
        bits = dyn["bits_per_dim"]
        self.log.log({"step": step, "val_bpb_dynamic": bits, "dynamic_eval_lr": lr})
        self.echo(f"adapting as it reads, as the compressors do (dynamic evaluation, SGD at {lr:g} after each "
                  f"window): {bits:.3f} {unit}, {'better' if bits < min(floor['bz2'], floor['xz']) else 'not better'} than both")
        return {"val_bits_per_dim_dynamic": bits, "dynamic_eval_lr": lr}

    def _export(self, step: int) -> None:
        """model.safetensors + config.json: the weights the run is evaluated and sampled with."""
        use_ema = bool(self.ema) and self.eval_with_ema
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = self.ema.state_dict() if use_ema else self.model.state_dict()
        if self.ws.main:
            export_weights(dict(state), self.cfg.to_dict(), self.out, self.data.modality, step, use_ema)

    def _sample(self) -> str:
        use_ema = bool(self.ema) and self.eval_with_ema
        if use_ema:
            self.ema.swap(self.model)
        n = min(self.cfg.train.sample_bytes, self.cfg.model.n_ctx - 1)
        sample = generate(self.model, 1, n, prompt=b"\n", seed=self.cfg.train.seed)[0, 1:].tolist()
        if use_ema:
            self.ema.swap(self.model)
        return bytes(sample).decode("utf-8", errors="replace")
