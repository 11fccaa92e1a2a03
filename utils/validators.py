"""argparse types that check a number's range, shared by the common options and the methods'
own options (so models need not import the option parser)."""
from __future__ import annotations

import argparse


def _number(kind: type, low: float, low_inclusive: bool, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        too_low = value < low if low_inclusive else value <= low
        if too_low or (high is not None and value > high):
            bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high else "")
            raise argparse.ArgumentTypeError(f"{text} is out of range, it must be {bound}")
        return value
    return parse


positive_int = _number(int, 1, True)
non_negative_int = _number(int, 0, True)
positive_float = _number(float, 0, False)
non_negative_float = _number(float, 0, True)
percentage = _number(float, 0, False, 100)
fraction = _number(float, 0, False, 1)
switch = _number(int, 0, True, 1)
