"""`slimrec serve --engine ray` as a command: settings it refuses before starting anything, the Serve
config it prints (Ray's schema, an importable builder), and stopping: SIGTERM to the command, or
Ctrl-C (SIGINT to its process group), stops the local Ray cluster it started, leaving no process of
its session behind. Each stop test starts a cluster of its own (~30 s on 2 CPUs)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

pytest.importorskip("ray")  # the ray extra

from ray.serve._private.api import call_user_app_builder_with_args_if_necessary  # noqa: E402
from ray.serve._private.build_app import build_app as serve_build_app  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402
from ray_cluster import REPO, print_config, serve_ray_command, session_processes, wait_until  # noqa: E402
from serving_fixtures import ADMIN_TOKEN, copy_artifact  # noqa: E402
from slimrec.loadtest.launch import free_port  # noqa: E402
from slimrec.serving.ray_engine import IMPORT_PATH, build_app  # noqa: E402

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 120.0
GONE_WITHIN_S = 30.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLIMREC_") and k != "RAY_ADDRESS"}
    return {**env, **extra}


def serve_ray(tmp_path, *args: str) -> subprocess.CompletedProcess:
    """`slimrec serve --engine ray` on a copy of the golden artifact, run to its end."""
    artifact = copy_artifact(GOLDEN, tmp_path / "compressed")
    return subprocess.run(
        serve_ray_command("--variant", f"compressed={artifact}", *args),
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ingress-replicas", "2"], "ingress_replicas=2 needs --state redis://"),
        (["--ingress-max-replicas", "3"], "ingress_max_replicas=3 needs --state redis://"),
    ],
)
def test_more_than_one_ingress_replica_without_shared_state_is_refused_in_one_line(tmp_path, args, message):
    started = time.monotonic()
    result = serve_ray(tmp_path, *args)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert message in line and "live histories" in line
    assert time.monotonic() - started < 60  # refused before any Ray process started


def test_the_printed_config_is_a_serve_config_whose_builder_builds_the_application(tmp_path):
    artifact = copy_artifact(GOLDEN, tmp_path / "compressed")
    text = print_config(
        "--variant",
        f"compressed={artifact}",
        "--model-replicas",
        "3",
        "--port",
        "8123",
        env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    assert ADMIN_TOKEN not in text
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    assert config.http_options.host == "127.0.0.1" and config.http_options.port == 8123
    (application,) = config.applications
    assert application.import_path == IMPORT_PATH
    module, _, name = IMPORT_PATH.partition(":")
    assert __import__(module, fromlist=[name]).build_app is build_app
    built = call_user_app_builder_with_args_if_necessary(build_app, application.args)
    deployments = {d.name: d for d in serve_build_app(built, name=application.name).deployments}
    assert set(deployments) == {"ingress", "model-compressed", "registry"}
    assert deployments["model-compressed"].num_replicas == 3
    assert deployments["model-compressed"].ray_actor_options["num_cpus"] == 0.25
    assert deployments["ingress"].ray_actor_options["num_cpus"] == 0.25
    assert deployments["registry"].ray_actor_options["num_cpus"] == 0
    assert application.args["variants"] == {"compressed": str(artifact.resolve())}


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_stopping_leaves_no_process_of_the_session(tmp_path, how):
    artifact = copy_artifact(GOLDEN, tmp_path / "compressed")
    port = free_port()
    command = serve_ray_command(
        *("--variant", f"compressed={artifact}", "--model-replicas", "2", "--num-cpus", "2"),
        *("--port", str(port), "--state-dir", str(tmp_path / "state"), "--log-level", "warning"),
    )
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env=clean_env(SLIMREC_ADMIN_TOKEN=ADMIN_TOKEN),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: every process it starts is in it
        )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_until(lambda: process.poll() is not None or _ready(url), READY_TIMEOUT_S, 0.5)
        assert ready and process.poll() is None, log_path.read_text(errors="replace")[-4000:]
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v1/recommend", json={"user_id": "196", "k": 5}).status_code == 200
            split = client.put(
                "/admin/split",
                json={"weights": {"compressed": 1}},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            assert split.status_code == 200, split.text  # the token reached the ingress replica
        running = session_processes(process.pid)
        assert len(running) > 8, [p.name() for p in running]  # the cluster is in the session
        if how == "sigterm":
            process.send_signal(signal.SIGTERM)
        else:
            os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends
        assert process.wait(STOP_TIMEOUT_S) == 0, log_path.read_text(errors="replace")[-4000:]
        gone = wait_until(lambda: not session_processes(process.pid), GONE_WITHIN_S, 0.5)
        assert gone, [(p.pid, p.name()) for p in session_processes(process.pid)]
    finally:
        if process.poll() is None:  # a failed check: stop it, by its own pid
            process.send_signal(signal.SIGTERM)
            process.wait(STOP_TIMEOUT_S)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_max_replicas_make_the_printed_deployments_autoscale(tmp_path):
    artifact = copy_artifact(GOLDEN, tmp_path / "compressed")
    text = print_config(
        "--variant", f"compressed={artifact}", "--model-replicas", "2", "--model-max-replicas", "4"
    )
    (application,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    built = call_user_app_builder_with_args_if_necessary(build_app, application.args)
    deployments = {d.name: d for d in serve_build_app(built, name=application.name).deployments}
    autoscaling = deployments["model-compressed"]._deployment_config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (2, 4)
    assert autoscaling.target_ongoing_requests == 2.0
    assert deployments["ingress"]._deployment_config.autoscaling_config is None
    assert deployments["ingress"].num_replicas == 1
