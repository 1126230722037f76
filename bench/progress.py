"""What a bench run says while it works (stderr), and the wall-clock seconds of its steps."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class Clock:
    """Named wall-clock seconds of consecutive steps."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now
        return self.seconds[name]
