"""Argument types of the command line: counts and integer lists, checked where they are parsed.

Standard library only, so any command's parser may use them without importing what it runs.
"""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated integers >= 0, e.g. '1,32'."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def parse_count(text: str) -> int:
    """'2k' -> 2000, '1m' -> 1000000, '500000' -> 500000 (k/m suffixes, case-insensitive); ValueError else."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"expected a count like 10k, 1m or 5000, got {text!r}") from None
    if value < 1 or value != int(value):
        raise ValueError(f"expected a positive whole count, got {text!r}")
    return int(value)


def count(text: str) -> int:
    """argparse type: `parse_count`, its error shown as argparse's."""
    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
