"""argparse types that check a number's range or an output path, shared by the common options,
the scripts and the methods' own options (so models need not import the option parser)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

# numpy's seeds (the largest 32-bit unsigned integer); torch's would take more.
MAX_SEED = 2 ** 32 - 1


def _number(kind: type, low: float, low_inclusive: bool, high: float | None = None):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
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
random_seed = _number(int, 0, True, MAX_SEED)


def _check_no_file_above(text: str, path: Path) -> None:
    """Refuse `path` when its nearest existing ancestor is a file (nothing can be made below
    it)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{parent} is a file, so {text} cannot be "
                                                 "made below it; give another path")
            return


def output_folder(text: str) -> Path:
    """A folder to write into (made when missing), refused before any work when it or one of
    its ancestors is a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder (made if missing)")
    _check_no_file_above(text, path)
    return path


def output_file(example_name: str) -> Callable[[str], Path]:
    """A file to write, refused before any work when it is a folder (the error suggests
    <folder>/<example_name>) or when one of its ancestors is a file."""
    def parse(text: str) -> Path:
        path = Path(text)
        if path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name such as "
                                             f"{path / example_name}")
        _check_no_file_above(text, path)
        return path
    return parse
