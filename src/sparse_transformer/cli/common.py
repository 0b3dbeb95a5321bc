"""What every part of the command line shares: the parser class and the one-line usage error."""
from __future__ import annotations

import argparse
import math


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit 2 (argparse would print the usage first)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least(low: int):
    """An argparse type: an integer >= low, the range named in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_at_least(low: float, strict: bool = False):
    """An argparse type: a finite number >= low (> low when ``strict``)."""
    bound = f"{'>' if strict else '>='} {low:g}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"expected a finite number {bound}, got {text}")
        return value

    parse.__name__ = f"number {bound}"
    return parse


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def size_arg(text: str) -> tuple[int, int]:
    try:
        parts = [int(x) for x in text.lower().split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH or one number, got {text!r}") from None
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH or one number, got {text!r}")
    return (parts[0], parts[-1])


def no_extra(extra: list[str]) -> None:
    """Commands without --section.key settings refuse anything argparse left over."""
    if extra:
        raise UsageError(f"unrecognised arguments: {' '.join(extra)}")
