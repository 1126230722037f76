"""The server's CPU per request, read against real servers; wrk as the generator; the trivial endpoint.

Real processes only: `slimrec serve` on the golden ml-100k artifact, the trivial endpoint under
uvicorn, wrk (skipped, and only those tests, where it is not installed; CI installs it), a
prometheus_client /metrics exporting this process's own CPU. Phases are 2 s: the figures are
checked for sense (positive, finite, the model costs more than the floor), not for speed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
from serving_fixtures import running_server
from slimrec.loadtest import wrk
from slimrec.loadtest.cpu import (
    MetricsCPU,
    ProcessTreeCPU,
    listener_cpu,
    parse_process_cpu,
    server_cpu_reader,
)
from slimrec.loadtest.launch import free_port, stop
from slimrec.loadtest.processes import ceiling_command, wait_ready
from slimrec.loadtest.run import LoadConfig

from slimrec.cli import main

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
# CI (.ci/run) installs wrk and sets SLIMREC_REQUIRE_WRK: there these tests fail, never skip, without it.
needs_wrk = pytest.mark.skipif(
    shutil.which("wrk") is None and not os.environ.get("SLIMREC_REQUIRE_WRK"),
    reason="wrk is not installed (CI installs it)",
)


@pytest.fixture(scope="module")
def trivial_endpoint(tmp_path_factory):
    """The trivial endpoint exactly as the ceiling phase starts it; yields (url, Popen)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("trivial") / "uvicorn.log", "wb")
    process = subprocess.Popen(ceiling_command(port), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, None, timeout_s=60)
        yield url, process
    finally:
        stop(process)
        log.close()


def post(url: str, body: bytes) -> tuple[int, str, bytes]:
    request = urllib.request.Request(f"{url}/v1/recommend", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["content-type"], response.read()


def test_trivial_endpoint_answers_a_constant_ten_items(trivial_endpoint):
    url, process = trivial_endpoint
    status, content_type, first = post(url, b'{"user_id": "1", "k": 10}')
    assert status == 200 and content_type == "application/json"
    answer = json.loads(first)
    assert answer["variant"] == "ceiling" and len(answer["items"]) == 10
    assert post(url, b"not even json")[2] == first  # the body is awaited, never parsed
    command = " ".join(psutil.Process(process.pid).cmdline())
    assert "--loop uvloop --http httptools --workers 1 --no-access-log" in command


def test_process_tree_cpu_counts_children_that_exited(tmp_path):
    # A parent that burns ~0.3 s itself, then starts a child burning ~0.3 s and reaps it: the
    # tree's CPU grows by both, though the child is gone when it is read at the end.
    script = (
        "import subprocess, sys, time\n"
        "def burn(s):\n"
        "    end = time.process_time() + s\n"
        "    while time.process_time() < end: pass\n"
        "sys.stdin.readline(); burn(0.3)\n"
        "subprocess.run([sys.executable, '-c', "
        "'import time\\nend = time.process_time() + 0.3\\nwhile time.process_time() < end: pass'])\n"
        "print('done', flush=True); sys.stdin.readline()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        reader = ProcessTreeCPU(parent.pid)
        before = reader.read()
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        after = reader.read()
        assert reader.processes == 1  # the child has exited: its time is in the parent's cutime
        assert 0.55 <= after - before <= 1.5, after - before
    finally:
        parent.stdin.close()
        stop(parent)


def test_metrics_cpu_sums_process_cpu_seconds_from_a_real_exporter():
    # prometheus_client's default registry exports this process's process_cpu_seconds_total.
    from prometheus_client import start_http_server

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port}"
        reader = server_cpu_reader(url, None)
        assert isinstance(reader, MetricsCPU)
        end = time.process_time() + 0.2
        while time.process_time() < end:
            pass
        own = sum(psutil.Process().cpu_times()[:2])
        assert reader.read() == pytest.approx(own, abs=0.05) and reader.processes == 1
    finally:
        server.shutdown()
        thread.join(5)
    assert parse_process_cpu("# HELP x\nslimrec_requests_total 5\n") is None
    both = 'process_cpu_seconds_total{pid="1"} 2.0\nslimrec_process_cpu_seconds_total 2.0\n'
    assert parse_process_cpu(both) == (2.0, 1)  # the same seconds under two names count once


@pytest.mark.parametrize("workers", [1, 2])
def test_host_mode_reads_the_servers_cpu_from_its_metrics(tmp_path, workers):
    # One process exports process_cpu_seconds_total; --workers 2 (multiprocess mode) the summed
    # slimrec_process_cpu_seconds_total. Either must agree with the process tree read from /proc.
    with running_server(tmp_path, {"compressed": GOLDEN}, "--workers", str(workers)) as server:
        reader = server_cpu_reader(server.url, None)
        assert isinstance(reader, MetricsCPU)
        tree = listener_cpu(server.url)  # the fallback for servers that export no CPU
        assert isinstance(tree, ProcessTreeCPU) and tree.root.pid == server.process.pid
        before = reader.read()
        for _ in range(50):
            server.client.post("/v1/recommend", json={"user_id": "1", "k": 10}).raise_for_status()
        time.sleep(1.5)  # workers add their CPU time every second
        from_metrics, from_proc = reader.read(), tree.read()
        assert from_metrics > before
        # The tree also holds uvicorn's parent with --workers (its CPU is not exported): a little more.
        assert 0.7 * from_proc - 0.3 <= from_metrics <= from_proc + 0.3, (from_metrics, from_proc)
    assert listener_cpu("http://192.0.2.1:8000") is None  # not this machine's: no /proc to read


@needs_wrk
def test_wrk_phases_read_server_cpu_against_the_trivial_endpoint(tmp_path):
    out = tmp_path / "run"
    args = ["--start", f"compressed={GOLDEN}", "--generator", "wrk", "--duration", "2s", "--warmup", "1s"]
    assert main(["loadtest", *args, "--ceiling", "--out", str(out)]) == 0
    report = json.loads((out / "loadtest-report.json").read_text())
    compressed, ceiling = report["variants"]["compressed"], report["ceiling"]
    for row in (compressed, ceiling):
        assert row["requests"] > 100 and row["failures"] == 0
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert math.isfinite(row["cpu_us_per_request"]) and row["cpu_us_per_request"] > 0
        assert 0 < row["cores_busy"] <= psutil.cpu_count() + 0.5
    assert compressed["cpu_us_per_request"] > ceiling["cpu_us_per_request"]  # a model costs more than nothing
    assert 0 < ceiling["generator_cpu_us_per_request"] < 1000  # wrk's own cost a request
    ratio = report["ratios"]["compressed/ceiling"]
    assert ratio["cpu_us_per_request"] == pytest.approx(
        compressed["cpu_us_per_request"] / ceiling["cpu_us_per_request"]
    )
    assert ratio["rps"] == pytest.approx(compressed["rps"] / ceiling["rps"])
    cpu = report["phases"]["compressed"]["server_cpu"]
    assert "started here" in cpu["source"] and cpu["requests"] == compressed["requests"]
    assert cpu["cpu_s"] / cpu["wall_s"] == pytest.approx(compressed["cores_busy"])
    markdown = (out / "loadtest-report.md").read_text()
    assert "wrk, 1 thread, 16 connections" in markdown and "compressed/ceiling CPU/request" in markdown
    assert not any(os.path.exists(f"/proc/{s['pid']}") for s in report["servers"].values())

    # wrk's own text (--latency) against the JSON line our script's done() printed: same run.
    parsed = wrk.parse_wrk_output((out / "logs" / "wrk-compressed.log").read_text())
    summary = parsed["summary"]
    assert parsed["requests"] == summary["requests"] == compressed["requests"]
    assert parsed["seconds"] == pytest.approx(summary["duration_us"] / 1e6, abs=0.01)
    for p in ("50", "90", "99"):  # printed with two decimals: rounding only
        assert parsed["percentiles_ms"][p] == pytest.approx(summary[f"p{p}_us"] / 1000, rel=0.01, abs=0.01)
    assert parsed["latency_ms"]["max"] == pytest.approx(summary["max_us"] / 1000, rel=0.01, abs=0.01)
    assert parsed["errors"] == {"connect": 0, "read": 0, "write": 0, "timeout": 0}


@pytest.fixture
def closing_server():
    """A TCP server that reads a request and closes the connection unanswered: wrk's read errors."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    done = threading.Event()

    def serve():
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.settimeout(1)
                with contextlib.suppress(OSError):
                    connection.recv(4096)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    done.set()
    thread.join(5)
    listener.close()


@needs_wrk
def test_parse_wrk_output_counts_non_2xx_and_socket_errors(trivial_endpoint, closing_server):
    url, _ = trivial_endpoint
    run = ["wrk", "-t", "1", "-c", "2", "-d", "1s", "--latency"]
    missing = subprocess.run([*run, f"{url}/no-such-route"], capture_output=True, text=True, timeout=30)
    parsed = wrk.parse_wrk_output(missing.stdout)
    assert parsed["requests"] > 0 and parsed["non_2xx"] == parsed["requests"]  # every answer a 404
    assert parsed["rps"] == pytest.approx(parsed["requests"] / parsed["seconds"], rel=0.02)
    row = wrk.wrk_row(parsed)  # no script: wrk's text alone
    assert row["failures"] == parsed["requests"] and math.isnan(row["p95_ms"]) and row["p50_ms"] > 0
    closed = subprocess.run([*run, closing_server], capture_output=True, text=True, timeout=30)
    parsed = wrk.parse_wrk_output(closed.stdout)
    assert parsed["requests"] == 0 and parsed["errors"]["read"] > 0, closed.stdout
    assert wrk.wrk_row(parsed)["failures"] == parsed["errors"]["read"]
    refused = subprocess.run(
        [*run, f"http://127.0.0.1:{free_port()}/"], capture_output=True, text=True, timeout=30
    )
    with pytest.raises(ValueError, match="no 'N requests in T' line"):  # "unable to connect", no figures
        wrk.parse_wrk_output(refused.stdout + refused.stderr)


def test_wrk_script_and_usage_errors(tmp_path, monkeypatch):
    # Quotes, backslashes and every non-ASCII byte as decimal escapes (Lua 5.1 has no \u):
    assert wrk.lua_string('Amélie "1"\\') == '"Am\\195\\169lie \\0341\\034\\092"'
    script = wrk.write_script(tmp_path / "s.lua", ["1", "2", "x/y"], "compressed").read_text()
    assert script.count("user_id") == 3 and '["X-Slimrec-Variant"] = "compressed"' in script
    assert wrk.request_bodies(["1", "2", "3"]) == wrk.request_bodies(["1", "2", "3"])  # seeded
    with pytest.raises(ValueError, match="--mode per-variant"):
        LoadConfig(generator="wrk", mode="ab")
    with pytest.raises(ValueError, match="--rate and --workers"):
        LoadConfig(generator="wrk", rate=100)
    monkeypatch.setenv("PATH", str(tmp_path))  # no wrk here
    with pytest.raises(ValueError, match="wrk is not on PATH"):
        LoadConfig(generator="wrk")
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--generator", "wrk"]) == 2
