"""Training progress: a tqdm bar on a terminal, plain lines in a log file.

When stderr is not a terminal (a SLURM log, ``> train.log 2>&1``), carriage-
return updates would pile up in the file, so the bar is replaced by one plain
line every ``interval`` seconds: step, loss, bits/dim, tokens/s and ETA. The
interval is 10 s, or 1/100 of a known time budget if that is longer, so a
10-minute run writes about 60 lines.
"""
from __future__ import annotations

import math
import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
    def __init__(self, *, steps: int, start: int, time_limit: float, by_time: bool, enabled: bool,
                 stream=None, interval: float | None = None):
        self.stream = stream or sys.stderr
        self.steps, self.time_limit, self.by_time = steps, time_limit, by_time
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.interval = interval if interval is not None else max(10.0, time_limit / 100)
        self.t0 = self.last = time.perf_counter()
        self.start, self.done, self.postfix = start, start, {}
        self.bar = None
        if self.tty:
            from tqdm import tqdm

            # A run scheduled on the clock ends with it, not at train.steps: no step total.
            self.bar = tqdm(total=None if by_time else steps, initial=start, unit="step", file=self.stream,
                            desc=f"{time_limit:.0f} s budget" if by_time else None, dynamic_ncols=True, leave=True)

    def update(self, done: int, loss: float | None = None, tok_s: float | None = None, elapsed: float = 0.0) -> None:
        """Called after every step; ``loss`` (nats) and ``tok_s`` when they were measured at this step."""
        if loss is not None:
            self.postfix = {"loss": loss, "tok_s": tok_s}
        if self.bar is not None:
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.3f}", bpb=f"{loss / math.log(2):.3f}", tok_s=f"{tok_s:,.0f}")
            self.bar.update(done - self.done)
        self.done = done
        now = time.perf_counter()
        if self.enabled and not self.tty and now - self.last >= self.interval and self.postfix:
            self.last = now
            self.stream.write(self.line(done, now - self.t0, elapsed) + "\n")
            self.stream.flush()

    def line(self, done: int, wall: float, elapsed: float) -> str:
        loss, tok_s = self.postfix["loss"], self.postfix["tok_s"]
        rate = (done - self.start) / max(wall, 1e-9)  # steps per second in this process
        left = [(self.steps - done) / rate if rate > 0 else math.inf]
        if self.time_limit:
            left.append(self.time_limit - elapsed)
        eta = min(left)
        total = "" if self.by_time else f"/{self.steps}"
        return (f"step {done}{total} | loss {loss:.4f} | {loss / math.log(2):.3f} bits/dim | {tok_s:,.0f} tok/s | "
                f"ETA {_clock(eta) if math.isfinite(eta) else '?'}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
