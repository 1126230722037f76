"""Shared state: live histories and the versioned split, in memory/file and on a real redis-server.

The history behaviour tests run against both implementations; the Redis ones start their own
redis-server on a loopback port (tests/redis_server.py). Async code runs under `asyncio.run`,
one event loop per test (a Redis client's connections belong to the loop that opened them).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis_server import redis_server_fixture, redis_server_path, start_redis  # noqa: F401 (a fixture)
from slimrec.serving.state import (
    FileSplitStore,
    HistoryEvent,
    MemoryHistoryStore,
    RedisHistoryStore,
    RedisSplitStore,
    SplitRecord,
    StateUnavailable,
    open_state,
)

AWKWARD_IDS = [
    "user with spaces",
    "a/b/../c",
    "a",
    "a:b",  # its key is "slimrec:hist:a:b": the id is the key's whole tail, so no clash with "a"
    "hist:a",
    ":",
    "Zoë 東京 🎬 ﷽",
    "%2F?#&+\"'",
    "u" * 128,
    "lone \ud800 surrogate",
]


def event(event_id: str, user_id: str, item_id: str, timestamp: float = 0.0) -> HistoryEvent:
    return HistoryEvent(event_id, user_id, item_id, timestamp)


def using(store: Any, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run body(store) on a fresh event loop, closing the store afterwards."""

    async def main():
        try:
            return await body(store)
        finally:
            await store.close()

    return asyncio.run(main())


@pytest.fixture(params=["memory", "redis"])
def make_history(request, tmp_path):
    """A factory of history stores: in-process, or on a fresh redis-server (two calls share it)."""
    if request.param == "memory":
        yield lambda **options: MemoryHistoryStore(**options)
        return
    with start_redis(tmp_path) as server:
        yield lambda **options: RedisHistoryStore(server.url, **options)


# ---- both history stores --------------------------------------------------------------------


def test_items_kept_in_arrival_order_not_timestamp_order(make_history):
    async def body(store):
        # Timestamps run backwards: arrival order wins (a late event lands last).
        assert await store.append([event("e1", "u", "a", 30.0), event("e2", "u", "b", 20.0)]) == [True, True]
        assert await store.append([event("e3", "u", "c", 10.0)]) == [True]
        assert await store.append([event("e4", "other", "z")]) == [True]
        return await store.get("u"), await store.get("other"), await store.get("nobody")

    assert using(make_history(), body) == (["a", "b", "c"], ["z"], [])


def test_keeps_the_last_max_per_user_items(make_history):
    async def body(store):
        await store.append([event(f"e{i}", "u", f"item{i}") for i in range(5)])
        await store.append([event("e5", "u", "item5")])
        return await store.get("u"), store.stats()

    items, stats = using(make_history(max_per_user=3), body)
    assert items == ["item3", "item4", "item5"]
    assert stats["trimmed_items"] == 3 and stats["appended_events"] == 6


def test_a_duplicate_event_id_is_applied_once_within_and_across_batches(make_history):
    async def body(store):
        first = await store.append([event("e1", "u", "a"), event("e2", "u", "b"), event("e1", "u", "a")])
        retry = await store.append([event("e2", "u", "b"), event("e3", "u", "c")])
        return first, retry, await store.get("u"), store.stats()

    first, retry, items, stats = using(make_history(), body)
    assert first == [True, True, False]
    assert retry == [False, True]
    assert items == ["a", "b", "c"]
    assert stats["duplicate_events"] == 2


def test_awkward_ids_each_have_their_own_history(make_history):
    async def body(store):
        events = [event(f"ev:{uid}", uid, f"item {uid}") for uid in AWKWARD_IDS]
        assert await store.append(events) == [True] * len(AWKWARD_IDS)
        # The same event ids again are retries, awkward characters and all.
        assert await store.append(events) == [False] * len(AWKWARD_IDS)
        return {uid: await store.get(uid) for uid in AWKWARD_IDS}, await store.get_many(AWKWARD_IDS)

    one_by_one, many = using(make_history(), body)
    expected = {uid: [f"item {uid}"] for uid in AWKWARD_IDS}
    assert one_by_one == expected
    assert many == expected


def test_get_many_omits_users_without_live_history(make_history):
    async def body(store):
        await store.append([event("e1", "u1", "a"), event("e2", "u2", "b"), event("e3", "u1", "c")])
        return await store.get_many(["u1", "ghost", "u2", "u1"]), await store.get_many([])

    many, empty = using(make_history(), body)
    assert many == {"u1": ["a", "c"], "u2": ["b"]}
    assert list(many) == ["u1", "u2"]
    assert empty == {}


def test_appending_nothing_is_a_no_op(make_history):
    async def body(store):
        return await store.append([]), store.stats()["appended_events"]

    assert using(make_history(), body) == ([], 0)


@pytest.mark.parametrize("options", [{"max_per_user": 0}, {"max_users": 0}, {"max_event_ids": -1}])
def test_memory_store_refuses_bounds_below_one(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        MemoryHistoryStore(**options)


@pytest.mark.parametrize("options", [{"max_per_user": 0}, {"ttl_s": 0}, {"dedup_ttl_s": -1.0}])
def test_redis_store_refuses_bounds_below_one(options):
    with pytest.raises(ValueError, match=next(iter(options))):
        RedisHistoryStore("redis://127.0.0.1:1/0", **options)  # refused before any connection


# ---- memory only ----------------------------------------------------------------------------


def test_memory_evicts_the_least_recently_used_user():
    async def body(store):
        await store.append([event("e1", "u1", "a"), event("e2", "u2", "b")])
        await store.get("u1")  # u1 is now more recent than u2
        await store.append([event("e3", "u3", "c")])
        return await store.get_many(["u1", "u2", "u3"]), store.stats()

    many, stats = using(MemoryHistoryStore(max_users=2), body)
    assert many == {"u1": ["a"], "u3": ["c"]}
    assert stats["evicted_users"] == 1 and stats["users"] == 2


def test_memory_load_rebuilds_histories_and_their_retries():
    store = MemoryHistoryStore(max_per_user=2)
    log = [event("e1", "u", "a"), event("e2", "u", "b"), event("e2", "u", "b"), event("e3", "u", "c")]
    assert store.load(log) == 3

    async def body(store):
        return await store.append([event("e3", "u", "c"), event("e4", "v", "d")]), await store.get("u")

    assert using(store, body) == ([False, True], ["b", "c"])


def test_memory_forgets_the_oldest_event_ids_past_its_bound():
    async def body(store):
        await store.append([event("e1", "u", "a"), event("e2", "u", "b"), event("e3", "u", "c")])
        return await store.append([event("e1", "u", "a"), event("e3", "u", "c")])

    # Two ids remembered: e1 was forgotten (applied again), e3 was not.
    assert using(MemoryHistoryStore(max_event_ids=2), body) == [True, False]


# ---- Redis only -----------------------------------------------------------------------------


def test_redis_history_and_event_keys_expire_and_appends_refresh_the_ttl(redis_server):
    async def body(store):
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await store.append([event("e1", "u:1", "a")])
            history_ttl = await raw.ttl("slimrec:hist:u:1")
            event_ttl = await raw.ttl("slimrec:event:e1")
            await raw.expire("slimrec:hist:u:1", 5)
            await store.append([event("e2", "u:1", "b")])
            return history_ttl, event_ttl, await raw.ttl("slimrec:hist:u:1")
        finally:
            await raw.aclose()

    store = RedisHistoryStore(redis_server.url, ttl_s=999.5, dedup_ttl_s=300)  # whole seconds: 1000
    history_ttl, event_ttl, refreshed = using(store, body)
    assert 990 <= history_ttl <= 1000
    assert 290 <= event_ttl <= 300
    assert refreshed > 5


def test_two_redis_stores_share_histories_and_retries(redis_server):
    async def body(first):
        second = RedisHistoryStore(redis_server.url)
        other_prefix = RedisHistoryStore(redis_server.url, prefix="other")
        try:
            await first.append([event("e1", "u", "a")])
            retried = await second.append([event("e1", "u", "a"), event("e2", "u", "b")])
            return retried, await first.get("u"), await other_prefix.get("u")
        finally:
            await second.close()
            await other_prefix.close()

    assert using(RedisHistoryStore(redis_server.url), body) == ([False, True], ["a", "b"], [])


def test_redis_append_is_one_round_trip_without_script_exists(redis_server):
    # redis-py's Script on a pipeline sends SCRIPT EXISTS before every batch; ours must not.
    async def body(store):
        for i in range(3):
            await store.append([event(f"e{i}", "u", "a"), event(f"f{i}", "v", "b")])
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            return await raw.info("commandstats")
        finally:
            await raw.aclose()

    stats = using(RedisHistoryStore(redis_server.url), body)
    assert "cmdstat_script|exists" not in stats
    assert stats["cmdstat_evalsha"]["calls"] == 8  # 6 events, plus the first batch resent after NOSCRIPT


def test_redis_reads_of_one_loop_turn_go_in_one_round_trip(redis_server):
    # Requests read histories concurrently; their reads are pipelined together, each answered its own.
    async def body(store):
        await store.append([event("e1", "u", "a"), event("e2", "u", "b"), event("e3", "v", "c")])
        raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        try:
            await raw.config_resetstat()
            got = await asyncio.gather(*(store.get(user) for user in ["u", "v", "w", "u"]))
            stats = await raw.info("commandstats")
            connections = (await raw.info("stats"))["total_connections_received"]
            later = await store.get("v")  # a read on a later turn is sent on its own
            return got, stats, connections, later
        finally:
            await raw.aclose()

    got, stats, connections, later = using(RedisHistoryStore(redis_server.url), body)
    assert got == [["a", "b"], ["c"], [], ["a", "b"]]
    assert got[0] is not got[3]  # each caller owns its list
    assert stats["cmdstat_lrange"]["calls"] == 3  # u, v, w: the repeated user is read once
    assert connections == 0  # one pipeline on the append's connection; reads sent apart open more
    assert later == ["c"]


def test_redis_down_raises_state_unavailable_fast_then_recovers(redis_server):
    async def body(store):
        await store.append([event("e1", "u", "a")])
        redis_server.stop()
        for call in (
            store.append([event("e2", "u", "b")]),
            store.get("u"),
            store.get_many(["u"]),
            store.ping(),
        ):
            started = time.monotonic()
            with pytest.raises(StateUnavailable):
                await call
            assert time.monotonic() - started < 2.0
        redis_server.restart()  # same port, empty (nothing is persisted)
        await store.ping()
        applied = await store.append([event("e2", "u", "b")])
        return applied, await store.get("u"), store.stats()["errors"]

    assert using(RedisHistoryStore(redis_server.url), body) == ([True], ["b"], 4)


def test_a_hung_redis_times_out_as_state_unavailable(redis_server):
    async def body(store):
        await store.ping()
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(StateUnavailable, match="Timeout"):
                await store.get("u")
            elapsed = time.monotonic() - started
        finally:
            redis_server.resume()
        return elapsed

    # Each try waits timeout_s; redis-py retries once, immediately.
    assert using(RedisHistoryStore(redis_server.url, timeout_s=0.3), body) < 2.0


# ---- split stores ---------------------------------------------------------------------------


@pytest.fixture(params=["file", "redis"])
def make_split(request, tmp_path):
    """A factory of split stores over the same state (a new object stands for a restarted process)."""
    if request.param == "file":
        yield lambda: FileSplitStore(tmp_path / "state" / "split.json")
        return
    with start_redis(tmp_path) as server:
        yield lambda: RedisSplitStore(server.url)


def test_split_versions_increment_and_survive_a_new_store(make_split):
    async def body(store):
        empty = await store.load()
        saved = [await store.save({"full": 50.0, "compressed": 50.0}) for _ in range(3)]
        return empty, [record.version for record in saved], saved[-1]

    empty, versions, last = using(make_split(), body)
    assert empty is None
    assert versions == [1, 2, 3]
    assert abs(last.updated_at - time.time()) < 60
    assert using(make_split(), lambda store: store.load()) == last


def test_split_keeps_the_weights_insertion_order(make_split):
    weights = {"zeta": 1.0, "alpha": 2.0, "mid": 0.0, "beta": 3.0}

    async def body(store):
        return await store.save(weights)

    saved = using(make_split(), body)
    loaded = using(make_split(), lambda store: store.load())
    assert list(saved.weights) == list(loaded.weights) == ["zeta", "alpha", "mid", "beta"]
    assert loaded.weights == weights
    assert list(SplitRecord.from_dict(json.loads(json.dumps(saved.to_dict()))).weights) == list(weights)


@pytest.mark.parametrize("weights", [{}, {"a": -1.0}, {"a": float("nan")}, {"a": 0.0, "b": 0.0}, {"": 1.0}])
def test_unusable_split_weights_are_refused_and_not_saved(make_split, weights):
    async def body(store):
        with pytest.raises(ValueError, match="split"):
            await store.save(weights)
        return await store.load()

    assert using(make_split(), body) is None


# Saves as fast as it can once both processes are ready (a "go" file), prints its versions.
SAVER = """
import asyncio, json, pathlib, sys, time
from slimrec.serving.state import FileSplitStore, RedisSplitStore
kind, target, ready, go, count = sys.argv[1:]
pathlib.Path(ready).touch()
deadline = time.monotonic() + 20
while not pathlib.Path(go).exists():
    if time.monotonic() > deadline:
        sys.exit("no go")
    time.sleep(0.002)
async def main():
    store = FileSplitStore(pathlib.Path(target)) if kind == "file" else RedisSplitStore(target)
    try:
        return [(await store.save({"full": 1.0, "compressed": float(i)})).version for i in range(int(count))]
    finally:
        await store.close()
print(json.dumps(asyncio.run(main())))
"""


def saves_from_two_processes(kind: str, target: str, tmp_path: Path, count: int = 25) -> list[int]:
    """The versions two processes saving `count` times each at once were given."""
    go = tmp_path / "go"
    processes = []
    try:
        for i in range(2):
            argv = [
                sys.executable,
                "-c",
                SAVER,
                kind,
                target,
                str(tmp_path / f"ready{i}"),
                str(go),
                str(count),
            ]
            processes.append(
                subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            )
        deadline = time.monotonic() + 20
        while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
            assert time.monotonic() < deadline, "savers never became ready"
            time.sleep(0.01)
        go.touch()
        versions = []
        for process in processes:
            out, err = process.communicate(timeout=30)
            assert process.returncode == 0, err
            versions += json.loads(out)
        return versions
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)


def test_concurrent_file_saves_from_two_processes_get_distinct_versions(tmp_path):
    versions = saves_from_two_processes("file", str(tmp_path / "split.json"), tmp_path)
    assert sorted(versions) == list(range(1, 51))
    assert using(FileSplitStore(tmp_path / "split.json"), lambda s: s.load()).version == 50


def test_concurrent_redis_saves_from_two_processes_get_distinct_versions(redis_server, tmp_path):
    versions = saves_from_two_processes("redis", redis_server.url, tmp_path)
    assert sorted(versions) == list(range(1, 51))
    assert using(RedisSplitStore(redis_server.url), lambda s: s.load()).version == 50


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"version": 1}', b'{"version": 0, "weights": [["a", 1]], "updated_at": 1}', b"\xff\xfe"],
)
def test_a_corrupt_split_file_raises_naming_the_file(tmp_path, content):
    path = tmp_path / "split.json"
    path.write_bytes(content)

    async def body(store):
        with pytest.raises(ValueError, match=re.escape(str(path))):
            await store.load()
        with pytest.raises(ValueError, match=re.escape(str(path))):
            await store.save({"a": 1.0})  # never guesses a version over a file it cannot read

    using(FileSplitStore(path), body)
    assert path.read_bytes() == content


def test_file_save_leaves_only_the_state_and_lock_files(tmp_path):
    using(FileSplitStore(tmp_path / "split.json"), lambda store: store.save({"a": 1.0}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.json", "split.json.lock"]
    stored = json.loads((tmp_path / "split.json").read_text())
    assert stored["version"] == 1 and stored["weights"] == [["a", 1.0]]


def test_a_corrupt_redis_split_raises_naming_the_key(redis_server):
    async def body(store):
        raw = aioredis.Redis.from_url(redis_server.url)
        try:
            await raw.set("slimrec:split", b"{not json")
        finally:
            await raw.aclose()
        with pytest.raises(ValueError, match="slimrec:split"):
            await store.load()
        with pytest.raises(ValueError, match="slimrec:split"):
            await store.save({"a": 1.0})

    using(RedisSplitStore(redis_server.url), body)


def test_redis_split_down_raises_state_unavailable(redis_server):
    async def body(store):
        await store.save({"a": 1.0})
        redis_server.stop()
        with pytest.raises(StateUnavailable):
            await store.load()
        with pytest.raises(StateUnavailable):
            await store.save({"a": 1.0})

    using(RedisSplitStore(redis_server.url), body)


# ---- open_state ------------------------------------------------------------------------------


def test_open_state_picks_the_pair_by_url(tmp_path):
    histories, split = open_state(None, tmp_path / "split.json", max_per_user=7)
    assert isinstance(histories, MemoryHistoryStore) and histories.max_per_user == 7
    assert isinstance(split, FileSplitStore) and split.path == tmp_path / "split.json"
    for url in ("redis://127.0.0.1:1/0", "rediss://example.invalid:6380", "unix:///tmp/no-such.sock"):
        histories, split = open_state(url, tmp_path / "split.json", prefix="p", ttl_s=60)
        assert isinstance(histories, RedisHistoryStore) and histories.prefix == "p" and histories.ttl_s == 60
        assert isinstance(split, RedisSplitStore) and split.key == "p:split"
        asyncio.run(histories.close())
        asyncio.run(split.close())


@pytest.mark.parametrize("url", ["", "http://127.0.0.1:6379", "127.0.0.1:6379", "memory"])
def test_open_state_refuses_other_urls_naming_them(tmp_path, url):
    with pytest.raises(ValueError, match=re.escape(f"state URL {url!r}")):
        open_state(url, tmp_path / "split.json")


def test_without_redis_server_tests_skip_locally_and_fail_under_ci(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no redis-server on PATH
    monkeypatch.delenv("SLIMREC_REQUIRE_REDIS", raising=False)
    with pytest.raises(pytest.skip.Exception):
        redis_server_path()
    monkeypatch.setenv("SLIMREC_REQUIRE_REDIS", "1")
    with pytest.raises(pytest.fail.Exception, match="SLIMREC_REQUIRE_REDIS"):
        redis_server_path()
