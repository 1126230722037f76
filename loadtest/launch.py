"""Start `slimrec serve` as a child process on a free loopback port, and stop it by its own pid.

Shared by the measuring tools (loadtest.measure, loadtest.soak), the load tester and the tests,
so that every server they start binds 127.0.0.1, is waited for under a deadline and is
stopped the same way: SIGTERM (a graceful shutdown), then SIGKILL if it has not exited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(variants: dict[str, str], port: int, *args: str) -> list[str]:
    """The `slimrec serve` command line for these variants on 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "slimrec.cli",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        *[a for n, p in variants.items() for a in ("--variant", f"{n}={p}")],
        *args,
    ]


def stop(process: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int:
    """SIGTERM this process, SIGKILL it if it is still running after timeout_s; its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
    return process.returncode


def is_ready(url: str) -> bool:
    with contextlib.suppress(OSError, urllib.error.URLError):
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # noqa: S310 (loopback URL)
            return response.status == 200
    return False


@contextlib.contextmanager
def local_server(variants: dict[str, str], *args: str, timeout_s: float = READY_TIMEOUT_S):
    """`slimrec serve` with only the settings given here (no SLIMREC_* from our environment).

    Yields (url, Popen) once /readyz answers 200; the server is stopped when the block ends.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMREC_")}
    state = tempfile.TemporaryDirectory(prefix="slimrec-state-")  # split and logs of this run only
    process = subprocess.Popen(serve_command(variants, port, "--state-dir", state.name, *args), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not is_ready(url):
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not ready after {timeout_s:.0f} s")
            time.sleep(0.2)
        yield url, process
    finally:
        stop(process)
        state.cleanup()
