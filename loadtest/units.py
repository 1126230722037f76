"""Durations on the command line, one grammar for every command that takes one.

Standard library only: the load tester speaks HTTP and imports nothing of the server.
"""

from __future__ import annotations

import re

UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = r"\d+(?:\.\d+)?"
_PART = re.compile(rf"({_NUMBER})(ms|h|m|s)")  # "ms" first: in "5ms" it is milliseconds, not minutes
_DURATION = re.compile(rf"{_NUMBER}|(?:{_NUMBER}(?:ms|h|m|s))+")


def parse_duration(text: str) -> float:
    """Seconds in '90s', '2m', '1h', '1m30s', '250ms' or '45' (a bare number is seconds).

    Case and spaces are ignored ('1m 30s'); no sign, no exponent. Callers check the range.

    Raises:
        ValueError: naming the text and the grammar.

    Example:
        >>> [parse_duration(t) for t in ("1m30s", "250ms", "45")]
        [90.0, 0.25, 45.0]
    """
    compact = "".join(str(text).split()).lower()
    if not _DURATION.fullmatch(compact):
        raise ValueError(f"duration {text!r}: expected e.g. 60s, 2m, 1m30s, 1h, 500ms or seconds")
    if compact[-1].isdigit():
        return float(compact)
    return sum(float(number) * UNIT_SECONDS[unit] for number, unit in _PART.findall(compact))
