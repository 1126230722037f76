"""Processes a load test starts: servers on free loopback ports, locust, each stopped by its own pid.

Every process listens on 127.0.0.1 only, is waited for under a deadline, and is stopped with
SIGTERM, then SIGKILL after STOP_TIMEOUT_S, also when something fails. Output goes to a log
file (and, for locust's progress, to our stdout).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from slimrec.loadtest.launch import READY_TIMEOUT_S, STOP_TIMEOUT_S, free_port, is_ready, serve_command, stop

REPO = Path(__file__).resolve().parents[1]
CPU_WARNING = "CPU usage above"  # locust's own warning that a generator process is saturated


class Process:
    """A subprocess whose output goes to a log file (and, with `echo`, to our stdout, prefixed)."""

    def __init__(self, command: list[str], log_path: Path, echo: str | None = None):
        self.command = command
        self.log_path = log_path
        self.url = ""
        self.seen_cpu_warning = False
        self._log = open(log_path, "w")
        try:
            self.process = subprocess.Popen(
                command,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        except BaseException:
            self._log.close()
            raise
        self._tee = threading.Thread(target=self._copy, args=(echo,), daemon=True)
        self._tee.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _copy(self, echo: str | None) -> None:
        with contextlib.suppress(ValueError, OSError):  # the log closed under us: a stop that gave up waiting
            for line in self.process.stdout:
                self._log.write(line)
                if CPU_WARNING in line:
                    self.seen_cpu_warning = True
                if echo is not None:
                    sys.stdout.write(f"[{echo}] {line}")
                    sys.stdout.flush()

    def tail(self, chars: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait(self, timeout: float) -> int:
        """Exit code; TimeoutError (after stopping the process) if it runs past `timeout`."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(
                f"{' '.join(self.command[:4])} ... (pid {self.pid}) still running after "
                f"{timeout:.0f} s; stopped. Log: {self.log_path}"
            ) from None

    def stop(self) -> int | None:
        """SIGTERM this pid, SIGKILL it after STOP_TIMEOUT_S; returns the exit code."""
        stop(self.process, STOP_TIMEOUT_S)
        self._tee.join(5)
        self._log.close()
        return self.process.returncode


def wait_ready(url: str, process: Process | None, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Poll GET /readyz until 200; RuntimeError if the process exits, TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.process.poll() is not None:
            raise RuntimeError(f"server exited with {process.process.returncode}:\n{process.tail()}")
        if is_ready(url):
            return
        time.sleep(0.2)
    raise TimeoutError(
        f"{url}/readyz not ready after {timeout_s:.0f} s" + (f":\n{process.tail()}" if process else "")
    )


@contextlib.contextmanager
def running(command: list[str], url: str, log_path: Path):
    """Start a server process, wait for /readyz, yield it (`.url`, `.pid`), stop it by its pid."""
    process = Process(command, log_path)
    process.url = url
    try:
        wait_ready(url, process)
        yield process
    finally:
        process.stop()


def slimrec_server(variants: dict[str, str], split: str | None, logs: Path, serve_args: tuple[str, ...] = ()):
    """`slimrec serve` with these variants on a free loopback port; a context manager yielding the Process."""
    port = free_port()
    # A state directory of the run's own, emptied first: a split stored by an earlier run would
    # win over this run's --split. The server's exposure and event logs land in it too.
    state = logs / "server-state"
    shutil.rmtree(state, ignore_errors=True)
    command = serve_command(variants, port, "--state-dir", str(state), *serve_args)
    if split:
        command += ["--split", split]
    return running(command, f"http://127.0.0.1:{port}", logs / "server.log")


def ceiling_command(port: int) -> list[str]:
    """The trivial endpoint as issue 16 fixes it: uvicorn, uvloop, httptools, one worker, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "slimrec.loadtest.ceiling_app:app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--loop",
        "uvloop",
        "--http",
        "httptools",
        "--workers",
        "1",
        "--no-access-log",
        "--log-level",
        "warning",
    ]


def ceiling_server(logs: Path):
    """The trivial endpoint (ceiling_app.py) on a free loopback port; a context manager yielding it."""
    port = free_port()
    command = ceiling_command(port)
    return running(command, f"http://127.0.0.1:{port}", logs / "ceiling.log")
