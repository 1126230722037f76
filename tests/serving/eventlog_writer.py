"""A process that logs events for test_eventlog.py: `python eventlog_writer.py DIR FLUSH_S [COUNT]`.

Writes {"kind": "event", "seq": n, "t": time.time(), "pid": pid} at about 2,000 a second and
prints every 100th `n` right after its write() (flushed), so the test knows how far it got.
Without COUNT it runs until killed (at most 30 s); with COUNT it writes that many, closes the
writer and exits 0.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from slimrec.serving.eventlog import LogWriter

RATE = 2000.0
MAX_S = 30.0


def main(directory: Path, flush_s: float, count: int | None) -> None:
    pid, started = os.getpid(), time.monotonic()
    with LogWriter(directory, flush_interval_s=flush_s) as writer:
        n = 0
        while (count is None or n < count) and time.monotonic() - started < MAX_S:
            writer.write({"kind": "event", "seq": n, "t": time.time(), "pid": pid})
            if n % 100 == 0:
                print(n, flush=True)
            n += 1
            ahead = started + n / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)


if __name__ == "__main__":
    main(Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
