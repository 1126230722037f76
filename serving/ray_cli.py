"""`slimrec serve --engine ray`: run the application on a Ray cluster, and stop what was started.

    slimrec serve --engine ray --variant full=artifacts/teacher --variant compressed=artifacts/compressed \\
                  --model-replicas compressed=2,full=1 [--address HOST:PORT] [--host 127.0.0.1 --port 8000]
    slimrec serve --engine ray --print-config ... > serve.yaml     # for `serve run` / `serve deploy`

Without `--address` (or RAY_ADDRESS) it starts a local Ray cluster (no dashboard, `ray_num_cpus`
CPUs) and stops it on exit; with one it joins that cluster and, on exit, deletes its
application (and shuts Serve down only if it started Serve there). `--host`/`--port` are the
options of Serve's HTTP proxy: the address clients use. SIGTERM or Ctrl-C stops it through
Ray's own API (`serve.shutdown()` / `serve.delete()`, then `ray.shutdown()`), which lets the
ingress replicas drain, and leaves no process of a cluster it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import threading

from slimrec.serving.settings import Settings

SHUTDOWN_TIMEOUT_S = 90.0  # Serve drains each replica for up to its graceful_shutdown_timeout_s (30 s)
REAP_TIMEOUT_S = 5.0  # a local cluster's processes left after ray.shutdown() get this long, then SIGTERM


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived before the application was running."""


def print_config(settings: Settings) -> int:
    """Write the Serve config (YAML) of these settings to stdout."""
    import yaml
    from slimrec.serving.ray_engine import serve_config

    print(
        "# `slimrec serve --engine ray` as a Ray Serve config: `serve run FILE` or `serve deploy FILE`.\n"
        "# The admin token is not written here: set SLIMREC_ADMIN_TOKEN where the application is built\n"
        "# (the environment of `serve run`, or of the cluster for `serve deploy`)."
    )
    print(yaml.safe_dump(serve_config(settings), sort_keys=False), end="")
    return 0


def run_ray(settings: Settings) -> int:
    """Start or join a cluster, run the application until SIGTERM/SIGINT, then stop what was started.

    Returns:
        0 after an orderly stop; 3 when the application could not be deployed (as uvicorn's
        startup failure), e.g. an artifact a replica refuses.
    """
    import ray
    from ray import serve
    from slimrec.serving.ray_engine import APP_NAME, INGRESS, build_application, new_metrics_dir
    from slimrec.serving.ray_models import model_deployment

    stop = threading.Event()
    metrics_dir = new_metrics_dir()
    running = False

    def on_signal(signum, frame) -> None:
        stop.set()
        if not running:
            raise Interrupted(signal.Signals(signum).name)

    address = settings.ray_address or os.environ.get("RAY_ADDRESS") or None
    started_cluster = not address
    level = logging.getLevelNamesMapping()[settings.log_level.upper()]
    try:
        if address:
            ray.init(address=address, logging_level=level)
        else:
            cpus = settings.ray_num_cpus or os.cpu_count() or 1
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=level)
    except ConnectionError as exc:
        raise ValueError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    # After ray.init: Ray's core worker installs a handler that aborts the process on SIGTERM.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    started_serve = False
    try:
        started_serve = not serve_is_running()
        if not started_serve:
            print(
                "slimrec serve: warning: Serve already runs on this cluster; its HTTP proxy keeps the "
                "host and port it was started with (--host/--port are not applied)",
                file=sys.stderr,
            )
        serve.start(http_options={"host": settings.host, "port": settings.port})
        try:
            serve.run(build_application(settings, metrics_dir), name=APP_NAME, route_prefix="/")
        except RuntimeError as exc:
            print(f"slimrec serve: cannot serve: {str(exc).splitlines()[0]}", file=sys.stderr)
            return 3
        running = True
        deployments = [f"{INGRESS} {replica_count(settings, None)}"] + [
            f"{model_deployment(name)} {replica_count(settings, name)}" for name in settings.variants
        ]
        cluster = address or f"local, {ray.cluster_resources().get('CPU', 0):g} CPUs"
        print(
            f"slimrec serve: {APP_NAME} on http://{settings.host}:{settings.port} "
            f"({', '.join(deployments)}; Ray cluster: {cluster})",
            file=sys.stderr,
            flush=True,
        )
        while not stop.wait(0.5):
            pass
        return 0
    except Interrupted:
        return 0
    finally:
        shut_down(APP_NAME, started_serve, started_cluster)
        shutil.rmtree(metrics_dir, ignore_errors=True)  # this node's; other nodes' stay in their /tmp
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def serve_is_running() -> bool:
    """Whether a Serve controller runs on the connected cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


def shut_down(app_name: str, started_serve: bool, started_cluster: bool) -> None:
    """Delete the application (or shut Serve down if this command started it), then disconnect;
    `ray.shutdown()` stops the processes of a local cluster this process started."""
    import psutil
    import ray
    from ray import serve

    if not ray.is_initialized():
        return

    def stop_serve() -> None:
        try:
            serve.shutdown() if started_serve else serve.delete(app_name)
        except Exception as exc:  # the cluster going away under us: ray.shutdown() still runs
            print(f"slimrec serve: warning: stopping Serve: {exc}", file=sys.stderr)

    # Bounded: a cluster whose processes already died (Ctrl-C reaches the whole process group)
    # must not hang the exit.
    stopper = threading.Thread(target=stop_serve, name="slimrec-serve-shutdown", daemon=True)
    stopper.start()
    stopper.join(SHUTDOWN_TIMEOUT_S)
    if stopper.is_alive():
        print("slimrec serve: warning: Serve did not stop in time; stopping Ray", file=sys.stderr)
    cluster = psutil.Process().children(recursive=True) if started_cluster else []
    ray.shutdown()
    reap(cluster)


def reap(processes: list) -> None:
    """Wait for the local cluster's processes to exit, and end those that do not, by pid.

    ray.shutdown() gives the raylet one second before SIGKILL; a raylet killed that way leaves
    its agent processes running for up to a minute (they report its death to a GCS that is gone).
    """
    import psutil

    _, alive = psutil.wait_procs(processes, timeout=REAP_TIMEOUT_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, alive = psutil.wait_procs(alive, timeout=REAP_TIMEOUT_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()


def replica_count(settings: Settings, variant: str | None) -> str:
    """A deployment's replicas as the start-up line shows them: "x2", or "x1-4 (autoscaling)"."""
    autoscaling = settings.autoscaling_of(variant)
    if autoscaling is not None:
        return f"x{autoscaling['min_replicas']}-{autoscaling['max_replicas']} (autoscaling)"
    return f"x{settings.replicas_of(variant) if variant else settings.ingress_replicas}"
