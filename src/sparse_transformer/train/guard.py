"""What keeps a run from losing work or reporting a wrong figure.

- ``RunLock``: one run per folder (an exclusive ``fcntl.flock`` on ``.lock``).
- ``StopSignals``: SIGTERM and SIGINT finish the current step; the loop then
  writes a checkpoint and stops (exit 0 for SIGTERM, so that a requeue
  resumes; 130 for SIGINT).
- ``Divergence``: a step whose loss or gradient norm is not finite is skipped
  and counted; ``limit`` in a row stop the run (exit 3). A checkpoint with
  non-finite weights is never written (``check_finite``).
"""
from __future__ import annotations

import math
import os
import signal
import threading
from pathlib import Path

import torch

from ..sysutil import make_dirs


class Diverged(RuntimeError):
    """The run diverged: the command line exits with code 3; the checkpoints on disk are the last good ones."""


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; ``code`` is the exit code (0 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signame: str, step: int, code: int):
        super().__init__(f"{signame}: stopped at step {step} with a checkpoint; continue with --resume")
        self.code = code


class RunLock:
    """An exclusive lock on ``out_dir/.lock`` for the life of the run; a second run fails at once naming the holder."""

    def __init__(self, out_dir: Path):
        self.path = out_dir / ".lock"
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "RunLock":
        import fcntl

        self.created = not self.path.parent.exists()
        make_dirs(self.path.parent)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another run (pid {holder}); "
                             "wait for it or choose another --train.out_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        # A folder this run created and left empty (it failed before writing anything) goes again, removed
        # while the lock is held. Otherwise the lock file stays: removing it would race a waiting run.
        if self.created and [p.name for p in self.path.parent.iterdir()] == [self.path.name]:
            self.path.unlink(missing_ok=True)
            try:
                self.path.parent.rmdir()
            except OSError:
                pass
        os.close(self.fd)  # closing releases the lock
        self.fd = None


def remove_stale_temps(out_dir: Path, echo=print) -> None:
    """Temp files of writes killed half-way (``.NAME.*.tmp``, see sysutil.atomic_write_*): the lock is held, so none is live."""
    stale = [p for p in out_dir.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    if stale:
        echo(f"removed {len(stale)} temp file(s) left by an interrupted write in {out_dir}")


class StopSignals:
    """Turns SIGTERM and SIGINT into a request to stop after the current step (main thread only)."""

    def __init__(self):
        self.received: int | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def stopped(self, step: int) -> Stopped:
        sig = signal.Signals(self.received or signal.SIGTERM)
        return Stopped(sig.name, step, 0 if sig == signal.SIGTERM else 130)


class Divergence:
    """Counts steps whose loss or gradient norm is not finite; ``limit`` in a row raise ``Diverged``."""

    def __init__(self, limit: int):
        self.limit, self.in_row, self.skipped = limit, 0, 0

    def step_ok(self, loss: float, grad_norm: float, step: int, echo=print) -> bool:
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.in_row = 0
            return True
        self.in_row += 1
        self.skipped += 1
        echo(f"step {step}: loss {loss}, gradient norm {grad_norm}: not finite, step skipped "
             f"({self.in_row} in a row, {self.skipped} in all)")
        if self.in_row >= self.limit:
            raise Diverged(f"{self.in_row} steps in a row had a non-finite loss or gradient (last at step {step}); "
                           "the run stopped and the last good checkpoint is kept. Lower train.lr or raise train.warmup")
        return False


def check_finite(model: torch.nn.Module) -> None:
    """Refuse to save weights that are not all finite."""
    for name, p in model.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise Diverged(f"parameter {name} is not finite: no checkpoint written, the last good one is kept")
