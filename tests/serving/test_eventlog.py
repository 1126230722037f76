"""The outcome log on real files and real processes: round trips, rotation, several writers,
a full queue, torn and corrupt lines, restarts, disk errors and kill -9."""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from slimrec.serving.eventlog import LogWriter, ReadStats, read_log, read_records

WRITER_SCRIPT = Path(__file__).with_name("eventlog_writer.py")
KINDS = ("exposure", "event", "split")


def records(n: int, source: str = "a") -> list[dict]:
    return [{"kind": KINDS[i % 3], "source": source, "seq": i, "items": ["x"] * (i % 5)} for i in range(n)]


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.jsonl"))


def write_all(writer: LogWriter, batch: list[dict]) -> None:
    assert all(writer.write(r) for r in batch)


@pytest.mark.parametrize("fsync", [False, True])
def test_round_trip_keeps_order_and_filters_kinds(tmp_path, fsync):
    sent = records(500)
    seen: list[int] = []
    with LogWriter(tmp_path / "logs", flush_interval_s=0.05, fsync=fsync, on_write=seen.append) as writer:
        write_all(writer, sent)
    assert (writer.written, writer.dropped, writer.segments, writer.queue_depth()) == (500, 0, 1, 0)
    assert sum(seen) == 500
    log = read_log(tmp_path / "logs")
    assert log.records == sent
    assert log.stats == ReadStats(segments=1, records=500, torn_tails=0, corrupt_lines=0)
    exposures = read_log(tmp_path / "logs", kinds={"exposure"})
    assert exposures.records == [r for r in sent if r["kind"] == "exposure"]
    assert exposures.stats.records == 500  # read, then filtered
    assert list(read_records(tmp_path / "logs", kinds={"split", "event"})) == [
        r for r in sent if r["kind"] != "exposure"
    ]


def test_numpy_values_are_written_and_an_unencodable_record_is_dropped_alone(tmp_path):
    with LogWriter(tmp_path) as writer:
        writer.write({"kind": "exposure", "scores": np.array([0.5, 0.25], np.float32), "k": np.int64(2)})
        writer.write({"kind": "event", "bad": {1, 2}})  # a set: not JSON
        writer.write({"kind": "event", "seq": 1})
    assert (writer.written, writer.dropped) == (2, 1)
    assert read_log(tmp_path).records == [
        {"kind": "exposure", "scores": [0.5, 0.25], "k": 2},
        {"kind": "event", "seq": 1},
    ]


def test_rotation_by_size_keeps_every_record_in_order(tmp_path):
    sent = records(300)
    with LogWriter(tmp_path, flush_interval_s=0.05, rotate_bytes=2000) as writer:
        write_all(writer, sent)
    files = segment_files(tmp_path)
    assert len(files) == writer.segments >= 5
    assert all(f.stat().st_size <= 2000 for f in files)
    assert read_log(tmp_path).records == sent  # one writer: name order is write order


def test_rotation_by_time(tmp_path):
    sent = records(40)
    with LogWriter(tmp_path, flush_interval_s=0.01, rotate_s=0.05) as writer:
        for chunk in range(4):
            write_all(writer, sent[chunk * 10 : chunk * 10 + 10])
            time.sleep(0.08)
    assert len(segment_files(tmp_path)) == writer.segments == 4
    assert read_log(tmp_path).records == sent


def test_two_writers_in_one_process_share_a_directory(tmp_path):
    a_sent, b_sent = records(300, "a"), records(300, "b")
    with LogWriter(tmp_path, rotate_bytes=3000) as a, LogWriter(tmp_path, rotate_bytes=3000) as b:
        for ra, rb in zip(a_sent, b_sent, strict=True):
            assert a.write(ra) and b.write(rb)
    names = [f.name for f in segment_files(tmp_path)]
    assert len(names) == a.segments + b.segments == len(set(names))
    got = read_log(tmp_path).records
    assert [r for r in got if r["source"] == "a"] == a_sent  # each writer's records once, in order
    assert [r for r in got if r["source"] == "b"] == b_sent
    assert len(got) == 600


def test_two_processes_share_a_directory(tmp_path):
    count = 500
    argv = [sys.executable, str(WRITER_SCRIPT), str(tmp_path), "0.05", str(count)]
    procs = [subprocess.Popen(argv, stdout=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(30) for p in procs] == [0, 0]
    log = read_log(tmp_path, strict=True)
    by_pid = {p.pid: [r["seq"] for r in log.records if r["pid"] == p.pid] for p in procs}
    assert by_pid == {p.pid: list(range(count)) for p in procs}  # every record exactly once
    names = [f.name for f in segment_files(tmp_path)]
    assert len(names) == 2 and all(any(f"-{p.pid}-" in n for n in names) for p in procs)


def test_a_full_queue_drops_counts_and_never_blocks(tmp_path):
    drops: list[int] = []
    writer = LogWriter(tmp_path, max_queue=10, on_drop=drops.append)  # not started: nothing drains
    assert all(writer.write({"kind": "event", "seq": i}) for i in range(10))
    took = []
    for i in range(10, 2010):
        start = time.perf_counter()
        assert writer.write({"kind": "event", "seq": i}) is False
        took.append(time.perf_counter() - start)
    took.sort()
    print(f"write() on a full queue: median {took[1000] * 1e6:.1f} us, max {took[-1] * 1e6:.1f} us")
    assert took[1000] < 50e-6 and sum(took) < 0.2  # microseconds each, never a wait
    assert (writer.dropped, sum(drops), writer.queue_depth()) == (2000, 2000, 10)
    with writer:  # started late, it writes what the queue held
        pass
    assert writer.written == 10 and [r["seq"] for r in read_log(tmp_path).records] == list(range(10))
    assert writer.write({"kind": "event"}) is False and writer.dropped == 2001  # closed
    writer.close()  # idempotent


def test_closing_a_writer_that_never_started_counts_its_queue_as_dropped(tmp_path):
    writer = LogWriter(tmp_path / "logs")
    write_all(writer, records(3))
    writer.close()
    assert (writer.written, writer.dropped) == (0, 3) and not (tmp_path / "logs").exists()


def test_a_torn_last_line_is_skipped_and_counted(tmp_path):
    sent = records(5)
    with LogWriter(tmp_path) as writer:
        write_all(writer, sent)
    (segment,) = segment_files(tmp_path)
    with open(segment, "ab") as f:
        f.write(b'{"kind": "event", "se')
    log = read_log(tmp_path, strict=True)  # a torn tail is a cut-short write, not damage
    assert log.records == sent
    assert log.stats == ReadStats(segments=1, records=5, torn_tails=1, corrupt_lines=0)
    with open(segment, "ab") as f:  # completed, still without its newline: a whole record
        f.write(b'q": 5}')
    log = read_log(tmp_path)
    assert log.records == [*sent, {"kind": "event", "seq": 5}] and log.stats.torn_tails == 0


def test_a_corrupt_middle_line_is_counted_and_strict_names_file_and_line(tmp_path):
    sent = records(5)
    with LogWriter(tmp_path) as writer:
        write_all(writer, sent)
    (segment,) = segment_files(tmp_path)
    lines = segment.read_bytes().split(b"\n")
    segment.write_bytes(b"\n".join([*lines[:2], b'{"kind": "ev\x00', b"[1, 2]", *lines[2:]]))
    log = read_log(tmp_path)
    assert log.records == sent
    assert log.stats == ReadStats(segments=1, records=5, torn_tails=0, corrupt_lines=2)
    with pytest.raises(ValueError, match=f"{segment.name}:3: "):
        read_log(tmp_path, strict=True)


def test_reading_a_missing_directory_fails_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        read_log(tmp_path / "nowhere")


def test_a_restarted_writer_writes_new_segments_and_leaves_old_ones_alone(tmp_path):
    first, second = records(200, "first"), records(200, "second")
    with LogWriter(tmp_path, rotate_bytes=4000) as writer:
        write_all(writer, first)
    before = {f.name: f.read_bytes() for f in segment_files(tmp_path)}
    with LogWriter(tmp_path, rotate_bytes=4000) as writer:
        write_all(writer, second)
    after = {f.name: f.read_bytes() for f in segment_files(tmp_path)}
    assert {name: after[name] for name in before} == before
    assert len(after) == len(before) + writer.segments
    got = read_log(tmp_path).records
    assert sorted(map(str, got)) == sorted(map(str, first + second))


def test_disk_errors_drop_and_count_but_never_stop_the_writer(tmp_path, caplog):
    logs = tmp_path / "logs"
    caplog.set_level(logging.WARNING, logger="slimrec.serving")
    with LogWriter(logs, flush_interval_s=0.01) as writer:
        write_all(writer, records(10, "before"))
        wait_for(lambda: writer.written == 10)
        shutil.rmtree(logs)  # the open segment is gone: what follows goes to a new one
        write_all(writer, records(10, "removed"))
        wait_for(lambda: writer.written == 20)
        shutil.rmtree(logs)
        logs.write_bytes(b"")  # a file where the directory was: no segment can be opened
        write_all(writer, records(10, "blocked"))
        wait_for(lambda: writer.dropped == 10)
        write_all(writer, records(10, "blocked again"))
        wait_for(lambda: writer.dropped == 20)
        logs.unlink()
        write_all(writer, records(10, "after"))
    assert (writer.written, writer.dropped) == (30, 20)
    assert [r["source"] for r in read_log(logs).records] == ["after"] * 10
    warnings = [r.getMessage() for r in caplog.records if r.name == "slimrec.serving"]
    assert len(warnings) == 1 and "segment was removed" in warnings[0]  # at most one per 10 s


def wait_for(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path):
    flush_s, slack_s = 0.2, 0.25
    proc = subprocess.Popen(
        [sys.executable, str(WRITER_SCRIPT), str(tmp_path), str(flush_s)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        printed = [int(proc.stdout.readline())]  # it is writing
        time.sleep(1.5 + random.uniform(0, flush_s))  # any phase of the flush cycle
        killed_at = time.time()
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
        printed += [int(n) for n in proc.stdout.read().split()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = read_log(tmp_path)
    seqs = [r["seq"] for r in log.records]
    logged = len(seqs)
    assert log.stats.corrupt_lines == 0 and log.stats.torn_tails <= log.stats.segments
    assert seqs == list(range(logged))  # a prefix: nothing lost before the last record logged
    # write() was called for at least printed[-1] + 1 records and fewer than printed[-1] + 100.
    missing_low, missing_high = max(0, printed[-1] + 1 - logged), printed[-1] + 100 - logged
    lag = killed_at - log.records[-1]["t"]
    print(
        f"kill -9 after {logged} logged: {missing_low}..{missing_high} missing, all written in the last "
        f"{lag:.3f} s (flush interval {flush_s} s, torn tails {log.stats.torn_tails})"
    )
    assert logged > 1000 and missing_high >= 0
    assert missing_low <= 2000 * (flush_s + slack_s)  # the script writes about 2,000 a second
    # Every missing record was written after the last logged one, so within `lag` of the kill.
    assert lag <= flush_s + slack_s, f"records written {lag:.3f} s before kill -9 were lost"
