"""What a server process keeps beyond its models: live histories, the stored split, the outcome log.

`LiveState.open()` picks the implementations from the settings: with `state` unset, histories
live in this process (bounded: a cap per user, an LRU over users) and are rebuilt from the
event log at startup, and the split is a state file; with `state=redis://...` both live in
Redis, shared by every process that names it. The log (exposures, events, splits) is JSON
Lines segments written off the request path (serving/eventlog.py).

Redis being unreachable never fails a recommendation: it is answered without the live history
(counted in slimrec_state_errors_total). Events are refused with 503 instead: they would be lost.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

from slimrec.serving.eventlog import LogWriter, read_records
from slimrec.serving.metrics import Metrics
from slimrec.serving.settings import Settings
from slimrec.serving.state import (
    FileSplitStore,
    HistoryEvent,
    HistoryStore,
    MemoryHistoryStore,
    RedisHistoryStore,
    RedisSplitStore,
    SplitStore,
    StateUnavailable,
)

log = logging.getLogger("slimrec.serving")


def redacted(url: str) -> str:
    """The URL without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def logged_history_events(records: Iterable[dict]) -> list[HistoryEvent]:
    """The events that entered live histories, in the order the log received them."""
    entered = [r for r in records if r.get("kind") == "event" and r.get("in_history")]
    entered.sort(key=lambda r: r["logged_at"])  # several segments (processes, restarts) interleave
    return [HistoryEvent(r["event_id"], r["user_id"], r["item_id"], r["time"]) for r in entered]


class LiveState:
    """Live histories, split store and outcome log of one server process (module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.history: HistoryStore
        self.splits: SplitStore
        self.log: LogWriter | None = None
        self.history_types = frozenset(settings.history_event_types or ()) or None  # None: every type
        self.where = redacted(settings.state) if settings.state else "this process"

    async def open(self) -> None:
        """Start the log writer and open the stores (rebuilding in-process histories from the log)."""
        settings, metrics = self.settings, self.metrics
        if settings.event_log:
            self.log = LogWriter(
                settings.logs_path,
                flush_interval_s=settings.log_flush_interval_s,
                max_queue=settings.log_queue,
                on_drop=metrics.log_dropped.inc,
                on_write=metrics.log_written.inc,
            )
            self.log.start()
        if settings.state:
            self.history = RedisHistoryStore(
                settings.state, max_per_user=settings.history_max_per_user, ttl_s=settings.history_ttl_s
            )
            self.splits = RedisSplitStore(settings.state)
            await self.history.ping()  # a wrong URL fails the start, not the first request
        else:
            memory = MemoryHistoryStore(
                max_per_user=settings.history_max_per_user, max_users=settings.history_max_users
            )
            if settings.event_log and settings.logs_path.is_dir():
                events = logged_history_events(read_records(settings.logs_path, kinds={"event"}))
                memory.load(events)
                log.info("live histories: %d events replayed from %s", len(events), settings.logs_path)
            self.history, self.splits = memory, FileSplitStore(settings.split_file)

    async def close(self) -> None:
        await self.history.close()
        await self.splits.close()
        if self.log is not None:
            self.log.close()

    def write(self, record: dict) -> None:
        """Hand a record to the log writer (never blocks; dropped and counted when its queue is full)."""
        if self.log is not None:
            self.log.write(record)

    async def history_of(self, user_id: str) -> list[str]:
        """The user's live item ids, oldest first; [] when live histories are off or the store is down."""
        if not self.settings.live_history:
            return []
        try:
            return await self.history.get(user_id)
        except StateUnavailable:
            self.metrics.state_errors.labels("read_history").inc()
            return []

    def enters_history(self, event_type: str) -> bool:
        return self.settings.live_history and (self.history_types is None or event_type in self.history_types)

    def record_stats(self) -> None:
        """Copy the history store's counters into the metrics (called at scrape time)."""
        stats = self.history.stats()
        for name, value in stats.items():
            self.metrics.live_history.labels(name).set(value)
        if self.log is not None:
            self.metrics.log_queue_depth.set(self.log.queue_depth())
