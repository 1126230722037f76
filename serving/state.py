"""State the server processes keep: users' live histories and the versioned A/B split.

Each has one interface and two implementations: in-process (`MemoryHistoryStore`,
`FileSplitStore`), for one server process; and Redis (`RedisHistoryStore`, `RedisSplitStore`),
shared by every process and replica that points at the same Redis. `open_state(url, ...)`
picks the pair. Redis failures (refused, timed out, wrong key type) surface as one exception,
`StateUnavailable`, so the server can answer 503 for writes and fall back for reads.

Histories keep items in arrival order (the order `append` is called in, and within a call the
list's order), not event timestamp order: a late event lands last. An event_id is applied
once: a retried event returns False. That memory is bounded, so a retry arriving after
`max_event_ids` newer events (in-process) or `dedup_ttl_s` seconds (Redis) is applied again.

Redis keys: `{prefix}:hist:{user_id}` (a list, newest last), `{prefix}:event:{event_id}` and
`{prefix}:split`. An id is the whole tail of its key and Redis keys are binary-safe, so any
string (spaces, '/', ':', unicode) is its own key and two distinct ids never share one. The
append script touches two keys, so Redis Cluster is not supported (one Redis, or a replica set).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import math
import os
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError, ResponseError

REDIS_SCHEMES = ("redis", "rediss", "unix")
LOCK_TIMEOUT_S = 10.0


class StateUnavailable(Exception):
    """Shared state could not be read or written (Redis down, timed out, or a lock not granted)."""


@dataclass(frozen=True, slots=True)
class HistoryEvent:
    """One validated interaction from POST /v1/events."""

    event_id: str
    user_id: str
    item_id: str
    timestamp: float


class HistoryStore(Protocol):
    async def append(self, events: list[HistoryEvent]) -> list[bool]: ...
    async def get(self, user_id: str) -> list[str]: ...
    async def get_many(self, user_ids: list[str]) -> dict[str, list[str]]: ...
    async def ping(self) -> None: ...
    def stats(self) -> dict[str, int]: ...
    async def close(self) -> None: ...


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be more than 0, got {value}")


class MemoryHistoryStore:
    """Live histories in this process: an LRU over users, a capped deque per user.

    Not thread-safe, and needs no lock: every method runs to completion without awaiting, so
    calls from the event loop never interleave. Call it from the event loop only (or, like
    `load`, before the server starts).

    Args:
        max_per_user: items kept per user; older ones are dropped (counted in `trimmed_items`).
        max_users: users kept; past it the least recently appended-to or read is dropped
            (counted in `evicted_users`).
        max_event_ids: event ids remembered to recognise retries (least recently seen forgotten).

    Example:
        >>> store = MemoryHistoryStore(max_per_user=2)
        >>> store.load([HistoryEvent("e1", "u", "a", 0.0), HistoryEvent("e2", "u", "b", 1.0)])
        2
        >>> asyncio.run(store.get("u"))
        ['a', 'b']
    """

    def __init__(self, max_per_user: int = 200, max_users: int = 100_000, max_event_ids: int = 1_000_000):
        _check_positive(max_per_user=max_per_user, max_users=max_users, max_event_ids=max_event_ids)
        self.max_per_user = max_per_user
        self.max_users = max_users
        self.max_event_ids = max_event_ids
        self._users: OrderedDict[str, deque[str]] = OrderedDict()
        self._event_ids: OrderedDict[str, None] = OrderedDict()
        self._counts = {"appended_events": 0, "duplicate_events": 0, "evicted_users": 0, "trimmed_items": 0}

    def load(self, events: Iterable[HistoryEvent]) -> int:
        """Apply events (e.g. the event log, at startup) as `append` would; returns how many applied."""
        return sum(self._apply(event) for event in events)

    async def append(self, events: list[HistoryEvent]) -> list[bool]:
        return [self._apply(event) for event in events]

    async def get(self, user_id: str) -> list[str]:
        items = self._touch(user_id)
        return list(items) if items is not None else []

    async def get_many(self, user_ids: list[str]) -> dict[str, list[str]]:
        found = {user_id: self._touch(user_id) for user_id in user_ids}
        return {user_id: list(items) for user_id, items in found.items() if items}

    async def ping(self) -> None:
        """Always reachable; here so callers need not know which store they hold."""

    def stats(self) -> dict[str, int]:
        """users, event_ids (remembered), appended_events, duplicate_events, evicted_users, trimmed_items."""
        return {"users": len(self._users), "event_ids": len(self._event_ids), **self._counts}

    async def close(self) -> None:
        pass

    def _apply(self, event: HistoryEvent) -> bool:
        if self._seen(event.event_id):
            self._counts["duplicate_events"] += 1
            return False
        items = self._touch(event.user_id)
        if items is None:
            items = self._users[event.user_id] = deque(maxlen=self.max_per_user)
            if len(self._users) > self.max_users:
                self._users.popitem(last=False)
                self._counts["evicted_users"] += 1
        if len(items) == self.max_per_user:
            self._counts["trimmed_items"] += 1  # the deque drops its oldest on append
        items.append(event.item_id)
        self._counts["appended_events"] += 1
        return True

    def _seen(self, event_id: str) -> bool:
        """True if event_id was seen before; remembers it either way (bounded LRU)."""
        if event_id in self._event_ids:
            self._event_ids.move_to_end(event_id)
            return True
        self._event_ids[event_id] = None
        if len(self._event_ids) > self.max_event_ids:
            self._event_ids.popitem(last=False)
        return False

    def _touch(self, user_id: str) -> deque[str] | None:
        """The user's items, marked most recently used; None for a user without live history."""
        items = self._users.get(user_id)
        if items is not None:
            self._users.move_to_end(user_id)
        return items


# KEYS: event key, history key. ARGV: item id, max_per_user, ttl_s, dedup_ttl_s.
# Returns {1, items trimmed} when applied, {0, 0} for an event_id seen before.
_APPEND_LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then
  return {0, 0}
end
local length = redis.call('RPUSH', KEYS[2], ARGV[1])
local keep = tonumber(ARGV[2])
redis.call('LTRIM', KEYS[2], -keep, -1)
redis.call('EXPIRE', KEYS[2], ARGV[3])
return {1, math.max(length - keep, 0)}
"""


def _connect(url: str, timeout_s: float) -> aioredis.Redis:
    """A client that fails fast: one immediate retry (for a connection a restarted Redis closed)."""
    # redis-py's default retries 10 times with backoff up to 1 s: seconds of waiting per request.
    # surrogatepass: ids are any Python str, lone surrogates included (they round-trip, as in memory).
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 1),
        decode_responses=True,
        encoding_errors="surrogatepass",
    )


@contextlib.contextmanager
def _unavailable_on_error(action: str) -> Iterator[None]:
    """Turn any Redis or socket failure into StateUnavailable."""
    try:
        yield
    except (RedisError, OSError) as exc:
        raise StateUnavailable(f"redis {action} failed: {type(exc).__name__}: {exc}") from exc


class RedisHistoryStore:
    """Live histories in Redis, shared by every process using the same URL and prefix.

    Each event's "dedupe, append, trim, refresh TTL" is one Lua script (atomic); a batch goes
    in one pipeline (one round trip). Args as `MemoryHistoryStore`, plus:

    Args:
        ttl_s: a history expires this long after its user's last append.
        dedup_ttl_s: how long an event_id is remembered.
        timeout_s: connect and per-command socket timeout.

    Raises (every method but `stats`):
        StateUnavailable: Redis refused, timed out or answered an error.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "slimrec",
        max_per_user: int = 200,
        ttl_s: float = 30 * 86400,
        dedup_ttl_s: float = 7 * 86400,
        timeout_s: float = 0.5,
    ):
        _check_positive(max_per_user=max_per_user, ttl_s=ttl_s, dedup_ttl_s=dedup_ttl_s)
        self.prefix = prefix
        self.max_per_user = max_per_user
        self.ttl_s = ttl_s
        self.dedup_ttl_s = dedup_ttl_s
        self._redis = _connect(url, timeout_s)
        self._append_script = self._redis.register_script(_APPEND_LUA)
        # EXPIRE and SET EX take whole seconds.
        self._append_args = (max_per_user, math.ceil(ttl_s), math.ceil(dedup_ttl_s))
        self._counts = {"appended_events": 0, "duplicate_events": 0, "trimmed_items": 0, "errors": 0}
        self._reads: list[tuple[str, asyncio.Future[list[str]]]] = []  # this loop turn's, not yet sent
        self._read_tasks: set[asyncio.Task] = set()

    def history_key(self, user_id: str) -> str:
        return f"{self.prefix}:hist:{user_id}"

    def event_key(self, event_id: str) -> str:
        return f"{self.prefix}:event:{event_id}"

    async def append(self, events: list[HistoryEvent]) -> list[bool]:
        if not events:
            return []
        with self._counting_errors("append"):
            replies = await self._append_pipelined(events)
        applied = [bool(done) for done, _ in replies]
        self._counts["appended_events"] += sum(applied)
        self._counts["duplicate_events"] += len(applied) - sum(applied)
        self._counts["trimmed_items"] += sum(trimmed for _, trimmed in replies)
        return applied

    async def _append_pipelined(self, events: list[HistoryEvent]) -> list[list[int]]:
        """One EVALSHA per event in one round trip; loads the script and resends if Redis lacks it."""
        # Not `script(..., client=pipe)`: that adds a SCRIPT EXISTS round trip to every batch.
        # NOSCRIPT means none of the batch ran (a fresh or flushed Redis), so resending is safe.
        for attempt in range(2):
            pipe = self._redis.pipeline(transaction=False)
            for event in events:
                keys = (self.event_key(event.event_id), self.history_key(event.user_id))
                pipe.evalsha(self._append_script.sha, 2, *keys, event.item_id, *self._append_args)
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(reply, NoScriptError) for reply in replies):
                await self._redis.script_load(_APPEND_LUA)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return replies
        raise AssertionError("unreachable")

    async def get(self, user_id: str) -> list[str]:
        """One user's history. The reads that requests make in one turn of the event loop go to
        Redis together, as one pipeline: a round trip of redis-py costs this process far more CPU
        than the LRANGE costs Redis, and under load a turn holds several requests."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[str]] = loop.create_future()
        self._reads.append((user_id, future))
        if len(self._reads) == 1:  # the first read of this turn sends them all once the turn ends
            loop.call_soon(self._send_reads)
        return await future

    def _send_reads(self) -> None:
        reads, self._reads = self._reads, []
        task = asyncio.ensure_future(self._answer_reads(reads))
        self._read_tasks.add(task)  # referenced until done (the loop keeps weak references only)
        task.add_done_callback(self._read_tasks.discard)

    async def _answer_reads(self, reads: list[tuple[str, asyncio.Future[list[str]]]]) -> None:
        try:
            with self._counting_errors("get"):
                found = await self._lrange_many([user_id for user_id, _ in reads])
        except StateUnavailable as exc:
            for _, future in reads:
                if not future.done():  # done: its request was cancelled (deadline, disconnect)
                    future.set_exception(exc)
            return
        for user_id, future in reads:
            if not future.done():
                future.set_result(list(found.get(user_id, ())))

    async def get_many(self, user_ids: list[str]) -> dict[str, list[str]]:
        if not user_ids:
            return {}
        with self._counting_errors("get_many"):
            return await self._lrange_many(user_ids)

    async def _lrange_many(self, user_ids: list[str]) -> dict[str, list[str]]:
        """{user: items} for the users with a history, in one round trip (LRANGE pipelined)."""
        unique = list(dict.fromkeys(user_ids))
        pipe = self._redis.pipeline(transaction=False)
        for user_id in unique:
            pipe.lrange(self.history_key(user_id), -self.max_per_user, -1)
        found = await pipe.execute()  # decode_responses=True: str, not bytes
        return {user_id: items for user_id, items in zip(unique, found, strict=True) if items}

    async def ping(self) -> None:
        with self._counting_errors("ping"):
            await self._redis.ping()

    def stats(self) -> dict[str, int]:
        """This process's counts: appended_events, duplicate_events, trimmed_items, errors."""
        return dict(self._counts)

    async def close(self) -> None:
        await self._redis.aclose()

    @contextlib.contextmanager
    def _counting_errors(self, action: str) -> Iterator[None]:
        try:
            with _unavailable_on_error(action):
                yield
        except StateUnavailable:
            self._counts["errors"] += 1
            raise


@dataclass(frozen=True)
class SplitRecord:
    """A saved A/B split: its version (1, 2, ...), weights in their order, and when it was saved.

    `to_dict` writes weights as [name, weight] pairs: a JSON object's key order is not kept by
    every reader (RFC 8259 calls it unordered), and the order fixes each variant's hash range.
    """

    version: int
    weights: dict[str, float]
    updated_at: float

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise ValueError(f"split version must be an integer >= 1, got {self.version!r}")
        object.__setattr__(self, "weights", check_weights(self.weights))
        if isinstance(self.updated_at, bool) or not isinstance(self.updated_at, int | float):
            raise ValueError(f"split updated_at must be a number, got {self.updated_at!r}")

    def to_dict(self) -> dict[str, Any]:
        pairs = [[name, weight] for name, weight in self.weights.items()]
        return {"version": self.version, "weights": pairs, "updated_at": self.updated_at}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SplitRecord:
        """The record `to_dict` wrote (weights as pairs, or as an object read in order)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"split record must be a JSON object, got {type(data).__name__}")
        missing = {"version", "weights", "updated_at"} - set(data)
        if missing:
            raise ValueError(f"split record lacks {', '.join(sorted(missing))}")
        weights = data["weights"]
        if isinstance(weights, list):
            if not all(isinstance(pair, list) and len(pair) == 2 for pair in weights):
                raise ValueError("split weights must be [name, weight] pairs")
            weights = dict(weights)
        return cls(data["version"], weights, data["updated_at"])


def check_weights(weights: Mapping[str, Any]) -> dict[str, float]:
    """The weights as a new dict of floats in the same order; ValueError unless usable for routing."""
    if not isinstance(weights, Mapping) or not weights:
        raise ValueError(f"split weights must be a non-empty mapping of name -> weight, got {weights!r}")
    checked: dict[str, float] = {}
    for name, weight in weights.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"split variant names must be non-empty strings, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"split weight of {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"split weight of {name!r} must be a finite number >= 0, got {weight}")
        checked[name] = float(weight)
    if sum(checked.values()) <= 0:
        raise ValueError("split weights must sum to more than 0")
    return checked


class SplitStore(Protocol):
    async def load(self) -> SplitRecord | None: ...
    async def save(self, weights: dict[str, float]) -> SplitRecord: ...
    async def close(self) -> None: ...


class FileSplitStore:
    """The split in a JSON file, replaced atomically; safe for several processes on one host.

    `save` holds an exclusive flock on `<file>.lock` while it reads the version and renames a
    fsynced temp file over the state file, so concurrent saves get distinct, consecutive
    versions and a reader sees the old file or the new one, never half of one. File work runs
    in a thread, off the event loop.

    Raises:
        ValueError (load, save): the state file exists but cannot be read or parsed (names it).
        StateUnavailable (save): the lock was not granted within LOCK_TIMEOUT_S.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    async def load(self) -> SplitRecord | None:
        return await asyncio.to_thread(self._read)

    async def save(self, weights: dict[str, float]) -> SplitRecord:
        checked = check_weights(weights)
        return await asyncio.to_thread(self._save_locked, checked)

    async def close(self) -> None:
        pass

    def _read(self) -> SplitRecord | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"split state file {self.path} cannot be read: {exc}") from exc
        try:
            return SplitRecord.from_dict(json.loads(text))
        except ValueError as exc:  # json.JSONDecodeError is a ValueError too
            raise ValueError(
                f"split state file {self.path} is corrupt ({exc}); fix or remove it, then save the split"
            ) from exc

    def _save_locked(self, weights: dict[str, float]) -> SplitRecord:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock():
            current = self._read()
            record = SplitRecord((current.version if current else 0) + 1, weights, time.time())
            self._write_atomically(json.dumps(record.to_dict(), allow_nan=False) + "\n")
        return record

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """An exclusive flock on the sibling lock file, waited for at most LOCK_TIMEOUT_S."""
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StateUnavailable(
                            f"{self.lock_path} held by another process for over {LOCK_TIMEOUT_S:.0f} s"
                        ) from None
                    time.sleep(0.005)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write_atomically(self, text: str) -> None:
        fd, temp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)


# KEYS: split key. ARGV: weights as JSON pairs, updated_at as a JSON number.
# The record is spliced as text so the weights' order never passes through a Lua table.
_SAVE_SPLIT_LUA = """
local version = 1
local current = redis.call('GET', KEYS[1])
if current then
  local ok, record = pcall(cjson.decode, current)
  if not ok or type(record) ~= 'table' or type(record['version']) ~= 'number' then
    return redis.error_reply('SLIMREC_CORRUPT the stored split has no numeric version')
  end
  version = record['version'] + 1
end
local text = '{"version": ' .. string.format('%d', version) .. ', "weights": ' .. ARGV[1]
  .. ', "updated_at": ' .. ARGV[2] .. '}'
redis.call('SET', KEYS[1], text)
return text
"""


class RedisSplitStore:
    """The split as one JSON record at `{prefix}:split`; `save` bumps the version in one Lua script.

    Raises:
        StateUnavailable: Redis refused, timed out or answered an error.
        ValueError: the stored record is corrupt (names the key).
    """

    def __init__(self, url: str, prefix: str = "slimrec", timeout_s: float = 0.5):
        self.key = f"{prefix}:split"
        self._redis = _connect(url, timeout_s)
        self._save_script = self._redis.register_script(_SAVE_SPLIT_LUA)

    async def load(self) -> SplitRecord | None:
        with _unavailable_on_error("split load"):
            text = await self._redis.get(self.key)
        return None if text is None else self._parse(cast(str, text))

    async def save(self, weights: dict[str, float]) -> SplitRecord:
        pairs = json.dumps([[name, w] for name, w in check_weights(weights).items()], allow_nan=False)
        try:
            with _unavailable_on_error("split save"):
                text = await self._save_script(keys=[self.key], args=[pairs, repr(time.time())])
        except StateUnavailable as exc:
            if isinstance(exc.__cause__, ResponseError) and "SLIMREC_CORRUPT" in str(exc.__cause__):
                raise ValueError(
                    f"redis key {self.key!r} holds a corrupt split record; fix or delete it"
                ) from exc
            raise
        return self._parse(text)

    async def ping(self) -> None:
        with _unavailable_on_error("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()

    def _parse(self, text: str) -> SplitRecord:
        try:
            return SplitRecord.from_dict(json.loads(text))
        except ValueError as exc:
            raise ValueError(f"redis key {self.key!r} holds a corrupt split record ({exc})") from exc


def open_state(
    url: str | None,
    state_file: Path,
    *,
    prefix: str = "slimrec",
    max_per_user: int = 200,
    max_users: int = 100_000,
    max_event_ids: int = 1_000_000,
    ttl_s: float = 30 * 86400,
    dedup_ttl_s: float = 7 * 86400,
    timeout_s: float = 0.5,
) -> tuple[HistoryStore, SplitStore]:
    """The history and split stores for a state URL; connects lazily (call `ping()` to check).

    Args:
        url: None for this process only (memory + `state_file`); "redis://", "rediss://" or
            "unix://" for Redis, shared across processes.
        state_file: the split's JSON file when url is None.
        Each store takes the options that apply to it: memory uses max_per_user, max_users and
        max_event_ids; Redis uses prefix, max_per_user, ttl_s, dedup_ttl_s and timeout_s.

    Example:
        >>> histories, split = open_state(None, Path("/tmp/split.json"))
        >>> type(histories).__name__, type(split).__name__
        ('MemoryHistoryStore', 'FileSplitStore')
    """
    if url is None:
        return MemoryHistoryStore(max_per_user, max_users, max_event_ids), FileSplitStore(state_file)
    if urlsplit(url).scheme not in REDIS_SCHEMES:
        schemes = ", ".join(scheme + "://" for scheme in REDIS_SCHEMES)
        raise ValueError(f"state URL {url!r} is not one of {schemes} (or unset for memory)")
    histories = RedisHistoryStore(
        url,
        prefix=prefix,
        max_per_user=max_per_user,
        ttl_s=ttl_s,
        dedup_ttl_s=dedup_ttl_s,
        timeout_s=timeout_s,
    )
    return histories, RedisSplitStore(url, prefix=prefix, timeout_s=timeout_s)
