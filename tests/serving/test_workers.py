"""`slimrec serve --workers 2`: one service, not two. /metrics from either worker counts every
worker's requests (prometheus_client multiprocess mode), and a split changed through one worker
is in force on both (they follow the stored split). Connections opened at once reach both
workers (a listening socket each)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import time

import pytest
from serving_fixtures import ADMIN_TOKEN, metric_value, running_server
from slimrec.serving.workers import reuse_port_sockets

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REQUESTS = 120


def test_two_workers_count_and_route_as_one_server(tiny_teacher, tmp_path):
    variants = {"full": tiny_teacher, "compressed": tiny_teacher}
    env = {"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN, "SLIMREC_STATE_REFRESH_S": "0.2"}
    with running_server(tmp_path, variants, "--workers", "2", env=env) as server:
        pids = set()
        for n in range(REQUESTS):  # new connections: uvicorn's workers share the listening socket
            response = server.client.post(
                "/v1/recommend", json={"user_id": str(1 + n)}, headers={"Connection": "close"}
            )
            assert response.status_code == 200, response.text
            pids.add(response.json()["request_id"].split("-")[0])
        assert len(pids) == 2, "every request went to one worker: the test shows nothing"
        for _ in range(3):  # whichever worker answers the scrape sums both
            text = server.client.get("/metrics", headers={"Connection": "close"}).text
            total = sum(
                metric_value(text, "slimrec_requests_total", variant=v, endpoint="recommend", status="200")
                or 0
                for v in variants
            )
            assert total == REQUESTS
        response = server.client.put("/admin/split", json={"weights": {"compressed": 1}}, headers=AUTH)
        assert response.status_code == 200, response.text
        time.sleep(1.0)  # five refresh periods
        routed = {
            server.client.post(
                "/v1/recommend", json={"user_id": str(u)}, headers={"Connection": "close"}
            ).json()["variant"]
            for u in range(1, 60)
        }
        assert routed == {"compressed"}


CONNECTIONS = 16


def test_connections_opened_at_once_reach_every_worker(tiny_teacher, tmp_path):
    # A burst of new connections (wrk, a client's pool) used to land on whichever worker woke
    # first: it accepted every queued one. With a socket per worker the kernel spreads them
    # (all 16 on one: p = 2 / 2**16).
    with running_server(tmp_path, {"compressed": tiny_teacher}, "--workers", "2") as server:
        wait_for_both_workers(server)
        host, port = server.url.removeprefix("http://").split(":")
        connections = open_at_once(host, int(port), CONNECTIONS)
        try:
            workers = []
            for n, connection in enumerate(connections):
                answers = {worker_of(post(connection, str(1 + n))) for _ in range(3)}
                assert len(answers) == 1, answers  # a connection stays with the worker that took it
                workers.append(answers.pop())
        finally:
            for connection in connections:
                connection.close()
        assert len(set(workers)) == 2, workers


def open_at_once(host: str, port: int, n: int) -> list[http.client.HTTPConnection]:
    """n connections whose handshakes start within microseconds, as wrk's do: non-blocking
    connects in one loop, then a wait until each is established."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    for sock in sockets:
        sock.setblocking(False)
        sock.connect_ex((host, port))
    connections = []
    for sock in sockets:
        _, writable, _ = select.select([], [sock], [], 30)
        assert writable and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
        sock.setblocking(True)
        sock.settimeout(30)
        connection = http.client.HTTPConnection(host, port)
        connection.sock = sock
        connections.append(connection)
    return connections


def post(connection: http.client.HTTPConnection, user_id: str) -> dict:
    body = json.dumps({"user_id": user_id})
    connection.request("POST", "/v1/recommend", body, {"Content-Type": "application/json"})
    response = connection.getresponse()
    payload = response.read()
    assert response.status == 200, payload
    return json.loads(payload)


def worker_of(answer: dict) -> str:
    return answer["request_id"].split("-")[0]  # each process's tag


def wait_for_both_workers(server, timeout_s: float = 60) -> None:
    """Until a worker has started it does not listen, and the kernel sends every connection to
    the other: /readyz answered by one says nothing of the second."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < 2:
        assert time.monotonic() < deadline, f"only worker(s) {seen} answered in {timeout_s:.0f} s"
        response = server.client.post("/v1/recommend", json={"user_id": "1"}, headers={"Connection": "close"})
        seen.add(worker_of(response.json()))


def test_a_port_another_server_holds_is_refused_even_with_reuse_port():
    # Sockets with SO_REUSEPORT would join another server's group on the same port and split
    # its traffic with it: the address must be free.
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(OSError):
            reuse_port_sockets("127.0.0.1", other.getsockname()[1], 2)
    sockets = reuse_port_sockets("127.0.0.1", 0, 2)
    try:
        assert len({s.getsockname() for s in sockets}) == 1  # one address, a socket per worker
    finally:
        for sock in sockets:
            sock.close()
