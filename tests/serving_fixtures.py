"""Helpers for serving tests: real `slimrec serve` processes on free loopback ports, artifact copies."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
from slimrec.loadtest.launch import free_port, serve_command, stop

REPO = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def copy_artifact(source: Path, target: Path) -> Path:
    """A copy of an artifact directory (copies, not links: tests tamper with them)."""
    shutil.copytree(source, target)
    return target


class Server:
    """A `slimrec serve` subprocess; `url`, `client` and its log for failure messages."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMREC_")}
        # Each server keeps its split and logs apart unless the test shares a state dir on purpose.
        state_dir = str(log_path.parent / f"state-{self.port}")
        full_env.update(
            {
                "SLIMREC_DATA_DIR": os.environ.get("SLIMREC_DATA_DIR", ""),
                "SLIMREC_STATE_DIR": state_dir,
                **env,
            }
        )
        command = serve_command({}, self.port, *args)
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )
        self.client = httpx.Client(base_url=self.url, timeout=30.0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/readyz", timeout=1.0).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"server not ready after {timeout:.0f} s:\n{self.log()}")

    def stop(self) -> int | None:
        """SIGTERM our own process, SIGKILL it if it has not exited in time; returns its exit code."""
        self.client.close()
        stop(self.process, STOP_TIMEOUT_S)
        self._log.close()
        return self.process.returncode


@contextlib.contextmanager
def running_server(tmp_path: Path, variants: dict[str, Path], *args: str, env: dict[str, str] | None = None):
    """Start `slimrec serve` with the variants, wait for /readyz, yield the Server, stop it."""
    variant_args = [a for name, path in variants.items() for a in ("--variant", f"{name}={path}")]
    server = Server([*variant_args, *args], env or {}, tmp_path / f"server-{free_port()}.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text exposition (labels matched exactly), or None."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        sample_labels = {}
        if "{" in head:
            for pair in head[head.index("{") + 1 : -1].split(","):
                if pair:
                    key, _, raw = pair.partition("=")
                    sample_labels[key] = raw.strip('"')
        if head.split("{")[0] == name and sample_labels == labels:
            return float(value)
    return None
