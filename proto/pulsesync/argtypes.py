"""argparse types shared by the server's and the agent's command lines.

Each turns a flag's text into a value or raises `argparse.ArgumentTypeError` with one line
naming what was given and what is expected, which argparse prints as the usage error.
"""

from __future__ import annotations

import argparse
import math


def number(text: str) -> float:
    """A finite number (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive(text: str) -> float:
    """A finite number > 0 (seconds, a speed)."""
    value = number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be more than 0")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0 (a wait that may be none)."""
    value = number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must not be negative")
    return value


def whole(text: str, low: int = 1, high: int | None = None) -> int:
    """A whole number in low..high (high None: no upper bound)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if high is not None and not low <= value <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is outside {low}..{high}")
    if value < low:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least {low}")
    return value


def positive_int(text: str) -> int:
    """A whole number >= 1 (a count, a limit, a version)."""
    return whole(text)


def key_value(text: str) -> tuple[str, str]:
    """KEY=VALUE (a source option); the key stripped of spaces, the value kept as given."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key.strip(), value
