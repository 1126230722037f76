"""A real `redis-server` for tests: a child process on a free loopback port, stopped by its own pid.

Nothing is persisted (`--save ""`, no AOF): a stopped server comes back empty, as a lost Redis
would. Where redis-server is not installed the tests that need it skip, except under CI
(SLIMREC_REQUIRE_REDIS=1), where they fail: the shared-state tests must never be skipped there.

    from redis_server import redis_url_fixture     # noqa: F401  fixture `redis_url`: "redis://127.0.0.1:PORT/0"
    from redis_server import redis_server_fixture  # noqa: F401  fixture `redis_server`: the RedisServer
    with start_redis(tmp_path) as server: ...      # the same, by hand (server.url, stop, restart, pause)

(The fixtures' functions end in `_fixture` so that a test's `redis_url` argument does not shadow
an imported name; `pytest_plugins = ["redis_server"]` in tests/conftest.py would offer them to every
test without an import.)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from slimrec.loadtest.launch import free_port, stop

READY_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a free port can be taken between our probe and redis-server's bind


def redis_server_path() -> str:
    """Where redis-server is; skips the test locally, fails it under SLIMREC_REQUIRE_REDIS=1."""
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not on PATH (apt-get install redis-server)"
        if os.environ.get("SLIMREC_REQUIRE_REDIS") == "1":
            pytest.fail(f"{message}; SLIMREC_REQUIRE_REDIS=1 forbids skipping the Redis tests")
        pytest.skip(message)
    return path


def answers_ping(port: int) -> bool:
    """True if something on 127.0.0.1:port answers a RESP PING with +PONG."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server child process; `url` stays the same across `stop()` and `restart()`."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "redis.log"
        self.executable = redis_server_path()
        self.port = 0
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def start(self) -> RedisServer:
        """Start on a free port (a new one per attempt if the bind fails); returns self once PING answers."""
        for attempt in range(START_ATTEMPTS):
            self.port = free_port()
            if self._launch(last_attempt=attempt == START_ATTEMPTS - 1):
                return self
        raise AssertionError("unreachable")

    def restart(self) -> RedisServer:
        """Stop (if running) and start again on the same port, empty."""
        self.stop()
        self._launch(last_attempt=True)
        return self

    def stop(self) -> int | None:
        """SIGTERM our redis-server (SIGKILL after STOP_TIMEOUT_S); its exit code, None if not running."""
        if self.process is None:
            return None
        process, self.process = self.process, None
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)  # a paused server would hold the SIGTERM until resumed
        return stop(process, STOP_TIMEOUT_S)

    def pause(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel but never answered (a hung Redis)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def _launch(self, last_attempt: bool) -> bool:
        """Start redis-server on self.port and wait for PING; False if it exited early (port taken)."""
        command = [
            self.executable,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--protected-mode", "yes"),
            *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
        ]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code, self.process = self.process.returncode, None
                if last_attempt:
                    raise RuntimeError(f"redis-server exited with {code} on port {self.port}:\n{self.log()}")
                return False
            if answers_ping(self.port):
                return True
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"redis-server on port {self.port} did not answer PING in {READY_TIMEOUT_S:.0f} s")

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(tmp_path: Path) -> RedisServer:
    """A started RedisServer keeping its files under tmp_path/redis; use it as a context manager."""
    return RedisServer(tmp_path / "redis").start()


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server for one test, stopped afterwards."""
    with start_redis(tmp_path) as server:
        yield server


@pytest.fixture(name="redis_url")
def redis_url_fixture(tmp_path: Path) -> Iterator[str]:
    """The URL of a running redis-server for one test ("redis://127.0.0.1:PORT/0")."""
    # Self-contained (not built on `redis_server`), so importing this one fixture is enough.
    with start_redis(tmp_path) as server:
        yield server.url
