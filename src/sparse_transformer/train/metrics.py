"""metrics.jsonl (strict JSON, one row per logged step or evaluation) and TensorBoard when installed."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from ..sysutil import atomic_write_text


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
