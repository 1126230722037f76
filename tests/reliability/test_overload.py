"""Overload, deadlines and graceful shutdown, against real `slimrec serve` processes.

Slow requests come from `SLIMREC_INJECT_DELAY_MS` (a test-only setting, loopback binds only):
every model call sleeps that long first, so "more work than capacity" is deterministic.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from serving_fixtures import STOP_TIMEOUT_S, copy_artifact, metric_value, running_server
from slimrec.serving.app import create_app
from slimrec.serving.settings import Settings


@pytest.fixture(scope="module")
def artifact(tiny_teacher, tmp_path_factory):
    return copy_artifact(tiny_teacher, tmp_path_factory.mktemp("overload") / "teacher")


async def fire(url: str, n: int, path: str = "/v1/recommend") -> list[tuple[int, float, dict]]:
    """n concurrent requests on n connections: (status, seconds, headers) each."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one(i: int):
            t0 = time.perf_counter()
            response = await client.post(path, json={"user_id": str(i % 900 + 1), "k": 10})
            return response.status_code, time.perf_counter() - t0, dict(response.headers)

        return await asyncio.gather(*(one(i) for i in range(n)))


def test_past_max_in_flight_the_answer_is_an_immediate_503_with_retry_after(artifact, tmp_path):
    env = {
        "SLIMREC_MAX_IN_FLIGHT": "2",
        "SLIMREC_INJECT_DELAY_MS": "400",
        "SLIMREC_REQUEST_TIMEOUT_MS": "10000",
    }
    with running_server(
        tmp_path, {"full": artifact}, "--batch-max-size", "1", "--model-threads", "2", env=env
    ) as server:
        process = psutil.Process(server.process.pid)
        asyncio.run(fire(server.url, 8))  # warm: connections, ORT, the refusal path
        before = process.memory_info().rss
        rounds = [asyncio.run(fire(server.url, 40)) for _ in range(5)]
        after = process.memory_info().rss
        text = server.client.get("/metrics").text

    results = [r for burst in rounds for r in burst]
    admitted = [seconds for status, seconds, _ in results if status == 200]
    refused = [(seconds, headers) for status, seconds, headers in results if status == 503]
    assert len(admitted) + len(refused) == len(results), {s for s, _, _ in results}
    assert 2 * 5 <= len(admitted) <= 15 * 5, len(admitted)  # about max_in_flight per burst, never all 40
    assert len(refused) >= 25 * 5
    assert all(headers.get("retry-after") == "1" for _, headers in refused)
    refusal_ms = sorted(seconds * 1000 for seconds, _ in refused)
    admitted_ms = sorted(seconds * 1000 for seconds in admitted)
    # Refusals do not wait for the model (400 ms a call); admitted ones never queue behind 40.
    assert refusal_ms[len(refusal_ms) // 2] < 300 and refusal_ms[-1] < 2000, refusal_ms[-5:]
    assert admitted_ms[-1] < 3000, admitted_ms[-5:]
    growth_mib = (after - before) / 2**20
    print(
        f"{len(results)} requests over capacity: {len(admitted)} admitted (max {admitted_ms[-1]:.0f} ms), "
        f"{len(refused)} refused 503 (median {refusal_ms[len(refusal_ms) // 2]:.0f} ms, max "
        f"{refusal_ms[-1]:.0f} ms); RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB"
    )
    assert growth_mib < 15, f"server RSS grew {growth_mib:.1f} MiB under overload"
    assert metric_value(text, "slimrec_overload_rejections_total") >= len(refused)
    assert metric_value(text, "slimrec_in_flight_requests") == 0
    assert metric_value(text, "slimrec_requests_total", variant="none", endpoint="recommend", status="503")


def test_past_the_deadline_the_answer_is_a_504_and_the_server_keeps_serving(artifact):
    app = create_app(
        Settings(variants={"full": artifact}, inject_delay_ms=600, request_timeout_ms=150, batch_max_size=1)
    )
    with TestClient(app) as client:
        t0 = time.perf_counter()
        response = client.post("/v1/recommend", json={"user_id": "196"})
        elapsed = time.perf_counter() - t0
        assert response.status_code == 504 and "150 ms deadline" in response.json()["detail"]
        assert elapsed < 0.55, f"the 504 came after {elapsed:.2f} s, not at the deadline"
        assert client.get("/readyz").status_code == 200  # health, metrics, admin: not behind the model
        assert client.get("/v1/variants").status_code == 200
        text = client.get("/metrics").text
        assert metric_value(text, "slimrec_deadline_exceeded_total", variant="full") == 1
        assert metric_value(text, "slimrec_in_flight_requests") == 0  # the slot is freed at the deadline
        assert (
            metric_value(text, "slimrec_requests_total", variant="full", endpoint="recommend", status="504")
            == 1
        )


def test_inject_delay_is_refused_off_loopback(artifact):
    with pytest.raises(ValueError, match="inject_delay_ms is a test hook"):
        Settings(variants={"full": artifact}, inject_delay_ms=100, host="0.0.0.0")


def test_sigterm_lets_in_flight_requests_finish_and_exits_0(artifact, tmp_path):
    # 6 slow requests on 4 model threads: two are still queued when SIGTERM arrives.
    env = {"SLIMREC_INJECT_DELAY_MS": "1500", "SLIMREC_REQUEST_TIMEOUT_MS": "20000"}
    with running_server(
        tmp_path, {"full": artifact}, "--batch-max-size", "1", "--model-threads", "4", env=env
    ) as server:
        results: list[tuple[int, str]] = []

        def slow_request(i: int):
            try:
                with httpx.Client(base_url=server.url, timeout=30) as client:
                    response = client.post("/v1/recommend", json={"user_id": str(i + 1), "k": 5})
                    results.append((response.status_code, response.text[:100]))
            except httpx.HTTPError as exc:
                results.append((0, f"{type(exc).__name__}: {exc}"))

        threads = [threading.Thread(target=slow_request, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # all six admitted and sleeping in the model
            in_flight = metric_value(server.client.get("/metrics").text, "slimrec_in_flight_requests")
            if in_flight == 6:
                break
            time.sleep(0.05)
        assert in_flight == 6
        sent_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            code = server.process.wait(STOP_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            server.process.kill()  # our own pid; the test fails below
            code = None
        stopped_after = time.monotonic() - sent_at
        for thread in threads:
            thread.join(30)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.post(f"{server.url}/v1/recommend", json={"user_id": "1"}, timeout=2)
        log = server.log()
    assert [status for status, _ in results] == [200] * 6, results
    assert code == 0, f"exit code {code}:\n{log}"
    assert stopped_after >= 1.0, "the server exited before its in-flight requests could have finished"
    assert "Traceback" not in log
