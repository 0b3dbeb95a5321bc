"""Run configuration: dataclasses, presets, TOML files and ``--section.key value`` overrides."""
from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..model.config import ModelConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping (paper section 6)."""

    steps: int = 1000
    batch_size: int = 8  # sequences per optimizer step (global, over all processes)
    grad_accum: int = 1  # micro-batches per step
    lr: float = 1e-3
    warmup: int = 100  # linear warmup steps, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.01  # decoupled, on matrices only
    grad_clip: float = 1.0
    max_nonfinite: int = 5  # steps in a row with a non-finite loss or gradient (each skipped) before the run stops
    ema: float = 0.0  # Polyak averaging of the weights (0.999 in the paper's style); 0 = off
    precision: str = "auto"  # auto (bfloat16 where the hardware computes it, else float32) | float32 | bfloat16 | float16 (CUDA)
    compile: bool = False  # torch.compile the model for training (fuses the element-wise work; compiles at the first steps)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 1234
    eval_every: int = 0  # 0 = only at the end
    eval_max_bytes: int = 0  # 0 = the whole split
    # At the end of a text or audio run, also score the validation bytes with dynamic evaluation (the
    # model takes an SGD step at this rate on each window after scoring it, as a compressor adapts to
    # what it reads; Krause et al. 2018): printed beside the static figure. 0 = off.
    dynamic_eval_lr: float = 0.0
    ckpt_every: int = 0  # 0 = only at the end
    time_limit: float = 0.0  # seconds of training (in all, over resumes); 0 = no limit
    schedule: str = "steps"  # steps: cosine over train.steps | time: cosine over train.time_limit seconds
    stop_at: int = 0  # stop (with a checkpoint) at this step, to --resume later; the schedule still runs to steps
    log_every: int = 10
    sample_bytes: int = 200  # a short sample at the end of a text run; 0 = none
    out_dir: str = "runs/quick"
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    parallel: str = "ddp"  # under torchrun: ddp (DistributedDataParallel) | fsdp (FSDP2 fully_shard)
    grad_reduce_dtype: str = "float32"  # all-reduce gradients in float32 | bfloat16 | float16 (DDP comm hook)
    dist_timeout: float = 300.0  # seconds a collective may wait for the other processes


@dataclass
class DataConfig:
    """What to train on. ``name`` is a built-in corpus or a path.

    default: documentation text shipped inside Python's standard library
             (pydoc_data), available offline on every machine.
    A name prepared under ``dir`` by ``sparse-transformer data prepare``, or a
    path: a text/bytes file (first ``train_fraction`` for training, the rest
    for validation), or a prepared folder.
    """

    name: str = "default"
    train_fraction: float = 0.9
    dir: str = "data"  # where `sparse-transformer data prepare` puts datasets


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        cfg = cls()
        apply_dict(cfg, d, "")
        return cfg

    def validate(self) -> None:
        self.model.validate()
        t = self.train
        for name in ("steps", "batch_size", "grad_accum", "log_every", "max_nonfinite"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {getattr(t, name)!r}")
        for name in ("warmup", "eval_every", "ckpt_every", "eval_max_bytes", "sample_bytes", "threads", "stop_at"):
            if not isinstance(getattr(t, name), int) or getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {getattr(t, name)!r}")
        if t.batch_size % t.grad_accum:
            raise ValueError(f"train.batch_size ({t.batch_size}) must be a multiple of train.grad_accum ({t.grad_accum})")
        for name, lo, hi, lo_open, hi_open in FLOAT_RANGES:
            v = getattr(t, name)
            low_ok = v > lo if lo_open else v >= lo
            high_ok = v < hi if hi_open else v <= hi
            if not (math.isfinite(v) and low_ok and high_ok):
                allowed = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
                raise ValueError(f"train.{name} must be a finite number in {allowed}, got {v!r}")
        if t.precision not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"train.precision must be one of auto, float32, bfloat16, float16, got {t.precision!r}")
        if t.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"train.parallel must be ddp or fsdp, got {t.parallel!r}")
        if t.grad_reduce_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"train.grad_reduce_dtype must be one of float32, bfloat16, float16, got {t.grad_reduce_dtype!r}")
        if t.schedule not in ("steps", "time"):
            raise ValueError(f"train.schedule must be steps or time, got {t.schedule!r}")
        if t.schedule == "time" and not t.time_limit > 0:  # (time_limit is finite and >= 0 here)
            raise ValueError("train.schedule = 'time' needs train.time_limit > 0 (the seconds the schedule spans)")
        if not 0 < self.data.train_fraction < 1:  # (False for NaN)
            raise ValueError(f"data.train_fraction must be in (0, 1), got {self.data.train_fraction}")


# Every float setting of TrainConfig: (name, low, high, low excluded, high excluded). NaN and inf never pass.
FLOAT_RANGES = [
    ("lr", 0.0, 10.0, True, False),
    ("min_lr_ratio", 0.0, 1.0, False, False),
    ("beta1", 0.0, 1.0, False, True),
    ("beta2", 0.0, 1.0, False, True),
    ("weight_decay", 0.0, 10.0, False, False),
    ("grad_clip", 0.0, 1e9, True, False),
    ("ema", 0.0, 1.0, False, True),
    ("time_limit", 0.0, 1e9, False, False),
    ("dist_timeout", 0.0, 1e9, True, False),
    ("dynamic_eval_lr", 0.0, 10.0, False, False),
]

SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}


def _coerce(section: str, f: dataclasses.Field, value, from_text: bool):
    key = f"{section}.{f.name}"
    typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            if from_text and str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if from_text and str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool):
                raise ValueError
            if isinstance(value, int):
                return value
            if from_text:
                return int(str(value).replace("_", ""))
            raise ValueError
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value) if (from_text or isinstance(value, (int, float))) else _bad()
        if typ == "str":
            if isinstance(value, str):
                return value
            raise ValueError
        if typ.startswith("list"):
            if isinstance(value, list):
                return [int(v) for v in value]
            if from_text:
                text = str(value).strip("[] ")
                return [int(v) for v in text.replace("x", ",").split(",") if v.strip()] if text else []
            raise ValueError
    except (ValueError, TypeError):
        raise ValueError(f"{key} expects {typ}, got {value!r}") from None
    return value


def _bad():
    raise ValueError


def set_key(cfg: RunConfig, dotted: str, value, from_text: bool = True) -> None:
    """Set ``section.key`` on cfg, checking that the key exists and the value has its type."""
    section, _, name = dotted.partition(".")
    if section not in SECTIONS or not name:
        raise ValueError(f"unknown setting {dotted!r}; settings are model.*, train.*, data.*")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
    if name not in fields:
        raise ValueError(f"unknown setting {dotted!r}; allowed: {', '.join(section + '.' + k for k in fields)}")
    setattr(getattr(cfg, section), name, _coerce(section, fields[name], value, from_text))


def apply_dict(cfg: RunConfig, d: dict, origin: str) -> None:
    for section, values in d.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise ValueError(f"{origin}unknown section {section!r}; allowed: model, train, data")
        for k, v in values.items():
            try:
                set_key(cfg, f"{section}.{k}", v, from_text=False)
            except ValueError as e:
                raise ValueError(f"{origin}{e}") from None


def load_toml(cfg: RunConfig, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            d = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    apply_dict(cfg, d, f"{path}: ")


PRESET_DIR = Path(__file__).resolve().parent / "presets"


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def build_config(preset: str | None, config_file: str | None, overrides: list[tuple[str, str]]) -> RunConfig:
    """Preset, then TOML file, then command-line overrides; then validate."""
    cfg = RunConfig()
    name = preset or ("quick" if not config_file else None)
    if name:
        if name not in presets():
            raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(presets())}")
        load_toml(cfg, PRESET_DIR / f"{name}.toml")
    if config_file:
        load_toml(cfg, Path(config_file))
    for key, value in overrides:
        set_key(cfg, key, value)
    cfg.validate()
    return cfg


def resolve(cfg: RunConfig, dataset) -> tuple[RunConfig, str | None]:
    """The settings a run uses on ``dataset``: a new RunConfig (``cfg`` is not changed) and a note
    saying what the data decided, or None.

    Image data drives the model when model.data_shape is not given (sections 5.3, 7.1):
    model.data_shape becomes the images' shape, model.stride one image row (W * C: 96 for
    CIFAR-10, 28 for Fashion-MNIST) and model.n_ctx one image.
    """
    if dataset.modality != "image" or not dataset.shape or cfg.model.data_shape:
        return cfg, None
    H, W, C = dataset.shape
    new = RunConfig.from_dict(cfg.to_dict())
    new.model.data_shape = [H, W, C]
    new.model.stride = W * C
    new.model.n_ctx = H * W * C
    new.model.c = min(new.model.c, new.model.stride)
    new.validate()
    return new, (f"image data {H}x{W}x{C}: model.data_shape={H}x{W}x{C}, model.stride={W * C} (one row), "
                 f"model.n_ctx={H * W * C} (set model.data_shape yourself to choose otherwise)")
