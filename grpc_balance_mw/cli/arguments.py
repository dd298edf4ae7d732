"""Argument types that reject bad values with a usage error, and progress lines on stderr."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable

__all__ = ["bounded_float", "bounded_int", "progress"]


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an integer in ``low..high``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is not in {low}..{high}")
        return value

    return parse


def bounded_float(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a finite number in ``low..high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is not in {low:g}..{high:g}")
        return value

    return parse


def progress(message: str) -> None:
    """One line of progress on stderr (stdout carries only the results)."""
    print(f"grpc-balance: {message}", file=sys.stderr, flush=True)
