"""Helpers for the `--engine ray` tests: a local Ray cluster started (and stopped) by the test
process, the processes of a session, and `slimrec serve --engine ray --print-config`.

    with local_ray_cluster() as address: ...      # 2 CPUs, no dashboard; every process it started ends
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
SERVE_CLI = Path(sys.executable).parent / "serve"  # Ray's own CLI, installed with ray[serve]
CLUSTER_CPUS = 2


@contextlib.contextmanager
def local_ray_cluster(env: dict[str, str] | None = None):
    """ray.init a local cluster from this process; yields its GCS address. `env` is set while it
    starts (its workers inherit it), then restored. On exit: serve.shutdown(), ray.shutdown(),
    and every process the cluster started is waited for (ended by pid if it lingers)."""
    import ray
    from ray import serve
    from slimrec.serving.ray_cli import reap

    saved = {key: os.environ.get(key) for key in ("RAY_ADDRESS", *(env or {}))}
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.update(env or {})
    before = {p.pid for p in psutil.Process().children()}
    try:
        ray.init(
            address="local",
            num_cpus=CLUSTER_CPUS,
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    started = [p for p in psutil.Process().children() if p.pid not in before]
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        tree = started + [child for p in started if p.is_running() for child in p.children(recursive=True)]
        ray.shutdown()
        reap(tree)


def session_processes(sid: int) -> list[psutil.Process]:
    """Processes of session `sid` (zombies included: not yet reaped is not gone)."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(process.pid) == sid:
                found.append(process)
    return found


def wait_until(check, timeout_s: float, interval_s: float = 0.2):
    """The first truthy value of check() within timeout_s, else its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


def serve_ray_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "slimrec.cli", "serve", "--engine", "ray", *args]


def print_config(*args: str, env: dict[str, str] | None = None) -> str:
    """The YAML `slimrec serve --engine ray --print-config ARGS` writes."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMREC_")}
    full_env.update(env or {})
    result = subprocess.run(
        serve_ray_command("--print-config", *args),
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
