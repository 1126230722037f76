"""The outcome log: exposures, events and splits as append-only JSON Lines segments.

Records are plain dicts with a "kind" ("exposure", "event", "split"; serving/records.py shapes
them); this module stores and reads them and looks at nothing but "kind".

Writing never blocks the caller (the event loop): `LogWriter.write` appends the record to a
bounded deque and returns; with it full the record is dropped, counted (`dropped`,
`on_drop(1)`) and False returned. One background thread wakes every `poll_s` (a twentieth of a
second at most), takes what accumulated, encodes each record as one orjson line, and hands
what it wrote to the OS (file.flush(), plus os.fsync with `fsync=True`) at least every
`flush_interval_s`. Nobody signals the thread per record: a queue.Queue's put woke it (a lock,
a condition, a thread switch and a GIL hand-off) for nearly every record, which cost more CPU
than encoding and writing them (ml-100k compressed variant at saturation: ~100 us of a ~1 ms
request).

Durability: after `kill -9` of the process, at most the records handed to `write()` in the
last `flush_interval_s` (and whatever was still queued) are missing, and no segment is corrupt
except possibly a torn last line. The page cache survives kill -9; only `fsync=True` also
covers a power loss or a kernel crash, at the cost of one fsync per flush. Disk errors (full,
directory removed) never reach the caller: the records in hand are counted as dropped, a
warning is logged at most every 10 s, and the next batch goes to a new segment.

Segments are named `{host}-{pid}-{start, UTC YYYYmmddTHHMMSS}-{4 random hex}-{seq:06d}.jsonl`
and created with mode 'x', so any number of processes on any number of hosts can share one
directory without coordination, and a restarted process never appends to an old segment
(nor after a torn line). A segment is rotated after `rotate_bytes` or `rotate_s`, whichever
comes first (checked as records arrive: an idle writer adds no empty segments). Readers take
every `*.jsonl` in name order, each segment in write order; records of different segments
interleave in time, so consumers sort by their own time fields. A segment still being
written may end in a half-written line: counted as a torn tail, like one cut by kill -9.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

log = logging.getLogger("slimrec.serving")

BATCH = 1024  # records encoded between checks of the pending bytes
MAX_POLL_S = 0.05  # the writer thread wakes at least this often
MAX_PENDING_BYTES = 1 << 20  # flush early past this, so a burst cannot pile up in memory
ERROR_LOG_EVERY_S = 10.0


def host_name() -> str:
    """This host's name, reduced to characters safe in a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"


class LogWriter:
    """Appends records to JSON Lines segments from a background thread (module docstring).

    Example:
        with LogWriter(Path("logs"), flush_interval_s=0.5) as writer:
            writer.write({"kind": "event", "user_id": "196", "item_id": "242"})
    """

    def __init__(
        self,
        directory: Path,
        *,
        flush_interval_s: float = 1.0,
        max_queue: int = 10_000,
        rotate_bytes: int = 64 * 2**20,
        rotate_s: float = 3600.0,
        fsync: bool = False,
        on_drop: Callable[[int], Any] | None = None,
        on_write: Callable[[int], Any] | None = None,
    ):
        if flush_interval_s <= 0 or max_queue < 1 or rotate_bytes < 1 or rotate_s <= 0:
            raise ValueError(
                "LogWriter: flush_interval_s and rotate_s must be > 0, max_queue and rotate_bytes >= 1; "
                f"got {flush_interval_s}, {rotate_s}, {max_queue}, {rotate_bytes}"
            )
        self.directory = Path(directory)
        self.flush_interval_s, self.rotate_bytes, self.rotate_s = flush_interval_s, rotate_bytes, rotate_s
        self.fsync, self.on_drop, self.on_write = fsync, on_drop, on_write
        self.written = self.dropped = self.segments = 0
        self.max_queue = max_queue
        # Records wait here for the writer thread; deque.append and popleft are atomic under the GIL.
        self._records: deque[Any] = deque()
        self._wake = threading.Event()  # set by close(): stop sleeping, drain and exit
        self.poll_s = min(MAX_POLL_S, flush_interval_s / 4)
        self._count_lock = threading.Lock()  # `dropped` is counted from the caller's thread and ours
        self._thread: threading.Thread | None = None
        self._closed = False
        # The writer thread's own state.
        self._prefix = ""
        self._seq = 0
        self._file: IO[bytes] | None = None
        self._segment_bytes = 0
        self._segment_opened = 0.0
        self._pending = bytearray()  # encoded lines not yet handed to the OS
        self._pending_count = 0
        self._last_flush = 0.0
        self._last_error_log = -ERROR_LOG_EVERY_S

    def start(self) -> LogWriter:
        """Create the directory and start the writer thread."""
        if self._thread is None and not self._closed:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._new_prefix()
            self._thread = threading.Thread(target=self._run, name="slimrec-eventlog", daemon=True)
            self._thread.start()
        return self

    def write(self, record: dict) -> bool:
        """Queue one record; False (dropped, counted) when the queue is full or the writer closed."""
        if not self._closed and len(self._records) < self.max_queue:
            self._records.append(record)
            return True
        self._count_dropped(1)
        return False

    def queue_depth(self) -> int:
        return len(self._records)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued, flush, close the segment and join the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:  # never started: nothing will write the queued records
            self._count_dropped(self._drain())
            return
        self._wake.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("event log: the writer did not drain its queue within %.1f s", timeout_s)

    def __enter__(self) -> LogWriter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The writer thread.

    def _run(self) -> None:
        while True:
            stopping = self._closed  # read first: every record appended before close() is drained below
            while True:
                batch = self._take()
                self._handle(batch, final=stopping and len(batch) < BATCH)
                if len(batch) < BATCH:
                    break
            if stopping:
                break
            self._wake.wait(self.poll_s)
        self._close_segment()
        self._count_dropped(self._drain())  # written after close() raced past its check

    def _take(self) -> list[Any]:
        """Up to BATCH of the records waiting, oldest first."""
        records = self._records
        batch: list[Any] = []
        while records and len(batch) < BATCH:
            batch.append(records.popleft())
        return batch

    def _handle(self, batch: list[Any], *, final: bool) -> None:
        """Encode and buffer the batch, flushing when due; any failure drops what is in hand."""
        done = 0
        try:
            for record in batch:
                self._buffer(record)
                done += 1
            # A record waits up to poll_s to be taken: flushing poll_s early keeps it within the interval.
            due = time.monotonic() >= self._last_flush + self.flush_interval_s - self.poll_s
            if self._pending_count and (due or final or len(self._pending) >= MAX_PENDING_BYTES):
                self._flush()
        except Exception as exc:  # disk full, directory removed, a failing callback: never fatal
            self._count_dropped(self._pending_count + len(batch) - done)
            self._pending.clear()
            self._pending_count = 0
            self._close_segment()  # the next record opens a new one
            self._warn(f"{type(exc).__name__}: {exc}")

    def _buffer(self, record: Any) -> None:
        try:
            line = orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_APPEND_NEWLINE)
        except TypeError as exc:  # not JSON-serialisable: this record only
            self._count_dropped(1)
            self._warn(f"a record could not be encoded ({exc})")
            return
        if self._file is not None and (
            self._segment_bytes + len(line) > self.rotate_bytes
            or time.monotonic() - self._segment_opened >= self.rotate_s
        ):
            self._flush()
            self._close_segment()
        if self._file is None:
            self._open_segment()
        self._pending += line
        self._pending_count += 1
        self._segment_bytes += len(line)

    def _flush(self) -> None:
        """Hand the pending lines to the OS (and to the disk with fsync), then count them written."""
        self._last_flush = time.monotonic()
        if not self._pending_count:
            return
        assert self._file is not None
        if os.fstat(self._file.fileno()).st_nlink == 0:  # deleted under us: its lines would vanish
            self._warn("its segment was removed; starting a new one")
            self._close_segment()
            self._open_segment()
            self._segment_bytes = len(self._pending)
        self._file.write(self._pending)
        self._file.flush()
        if self.fsync:
            os.fsync(self._file.fileno())
        n, self._pending_count = self._pending_count, 0
        self._pending.clear()
        self.written += n
        if self.on_write is not None:
            self.on_write(n)

    def _open_segment(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)  # recreated if someone removed it
        for _ in range(3):
            self._seq += 1
            try:
                self._file = open(self.directory / f"{self._prefix}-{self._seq:06d}.jsonl", "xb")
                break
            except FileExistsError:  # another writer drew the same name in the same second
                self._new_prefix()
        else:
            raise FileExistsError(f"event log: no free segment name under {self.directory}")
        self._segment_bytes, self._segment_opened = 0, time.monotonic()
        self.segments += 1

    def _close_segment(self) -> None:
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError as exc:  # its buffer is already written or counted as dropped
                self._warn(f"closing a segment: {exc}")

    def _new_prefix(self) -> None:
        started = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        self._prefix = f"{host_name()}-{os.getpid()}-{started}-{secrets.token_hex(2)}"
        self._seq = 0

    def _drain(self) -> int:
        n = 0
        while self._records:
            self._records.popleft()
            n += 1
        return n

    def _count_dropped(self, n: int) -> None:
        if n:
            with self._count_lock:
                self.dropped += n
            if self.on_drop is not None:
                self.on_drop(n)

    def _warn(self, problem: str) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= ERROR_LOG_EVERY_S:
            self._last_error_log = now
            log.warning("event log %s: %s; %d records dropped so far", self.directory, problem, self.dropped)


@dataclass
class ReadStats:
    segments: int = 0
    records: int = 0  # records read (before the kinds filter)
    torn_tails: int = 0  # unparsable last lines without a newline: a write cut short
    corrupt_lines: int = 0  # unparsable lines elsewhere: damage


@dataclass
class LogContents:
    records: list[dict] = field(default_factory=list)
    stats: ReadStats = field(default_factory=ReadStats)


def read_records(
    directory: Path, kinds: set[str] | None = None, *, strict: bool = False, stats: ReadStats | None = None
) -> Iterator[dict]:
    """Every record of every `*.jsonl` segment in `directory`, segments in name order.

    Args:
        directory: the log directory (not searched recursively).
        kinds: keep only records whose "kind" is in this set; None keeps all.
        strict: raise ValueError naming file:line for a corrupt line (a torn tail is still skipped).
        stats: filled in while reading, when given.
    Returns:
        An iterator of dicts, each segment's records in the order they were written.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"event log directory {directory} does not exist")
    stats = stats if stats is not None else ReadStats()
    for path in sorted(p for p in directory.glob("*.jsonl") if p.is_file()):
        stats.segments += 1
        data = path.read_bytes()
        lines = data.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the empty string after the final newline
        cut_short = 0 if data.endswith(b"\n") else len(lines)  # a last line without its newline
        for number, line in enumerate(lines, 1):
            record = _parse(line)
            if record is None and number == cut_short:
                stats.torn_tails += 1
            elif record is None:
                stats.corrupt_lines += 1
                if strict:
                    raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}")
            else:
                stats.records += 1
                if kinds is None or record.get("kind") in kinds:
                    yield record


def _parse(line: bytes) -> dict | None:
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def read_log(directory: Path, kinds: set[str] | None = None, *, strict: bool = False) -> LogContents:
    """All records of the log in `directory` (as `read_records`), with what reading them found."""
    contents = LogContents()
    contents.records = list(read_records(directory, kinds, strict=strict, stats=contents.stats))
    return contents
