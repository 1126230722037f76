"""`kill -9` of a model replica under load (`--engine ray`), on a local Ray cluster of its own.

The application: one ingress replica, the compressed variant (the golden artifact) on 2 model
replicas, deployed with build_application + serve.run. Every model call sleeps INJECT_MS (the test
hook, applied in the model replicas) and the ingress runs 4 batches of the variant at once; the
replica is killed while its newest batch started under INJECT_MS / 3 ago, so it has batches in
flight: they fail with ActorDiedError and the ingress sends them again, once, to the other replica.
Clients must see no failed request and no fallback answer; Ray brings the replica back within 60 s.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")  # the ray extra

from ray import serve  # noqa: E402
from ray_cluster import local_ray_cluster, wait_until  # noqa: E402
from serving_fixtures import copy_artifact, metric_value  # noqa: E402
from slimrec.loadtest.launch import free_port  # noqa: E402
from slimrec.serving.deps import VARIANT_HEADER  # noqa: E402
from slimrec.serving.ray_engine import APP_NAME, INGRESS, build_application  # noqa: E402
from slimrec.serving.ray_models import model_deployment  # noqa: E402
from slimrec.serving.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
INJECT_MS = 150
CLIENT_THREADS = 8
LOAD_S = 20.0
BACK_WITHIN_S = 60.0


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> str:
    work = tmp_path_factory.mktemp("ray-faults")
    port = free_port()
    settings = Settings(
        engine="ray",
        variants={"compressed": copy_artifact(GOLDEN, work / "compressed")},
        model_replicas=2,
        batch_threads=2,  # x 2 replicas: the ingress runs 4 batches of the variant at once
        inject_delay_ms=INJECT_MS,
        port=port,
        state_dir=work / "state",
        event_log=False,
        log_level="warning",
    )
    with local_ray_cluster():
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"


def states(deployment: str) -> list[dict]:
    handle = serve.get_deployment_handle(deployment, APP_NAME)
    outcomes = handle.broadcast("state").results(timeout_s=30, return_exceptions=True)
    return [outcome for outcome in outcomes if isinstance(outcome, dict)]


def test_kill_9_of_a_model_replica_under_load_fails_no_request(app):
    replicas = states(model_deployment("compressed"))
    assert len(replicas) == 2
    victim = replicas[0]
    failures: list[str] = []
    answered = [0] * CLIENT_THREADS
    stop_at = time.monotonic() + LOAD_S

    def load(worker: int) -> None:
        with httpx.Client(base_url=app, timeout=30) as client:
            n = 0
            while time.monotonic() < stop_at:
                n += 1
                body = {"user_id": str(1 + (n * CLIENT_THREADS + worker) % 943), "k": 20}
                try:
                    response = client.post("/v1/recommend", json=body, headers={VARIANT_HEADER: "compressed"})
                except httpx.HTTPError as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                elif response.json()["fallback"] is not None:
                    failures.append(f"fallback {response.json()['fallback']}")
                else:
                    answered[worker] += 1

    workers = [threading.Thread(target=load, args=(i,)) for i in range(CLIENT_THREADS)]
    for worker in workers:
        worker.start()
    time.sleep(5)

    def victim_busy() -> bool:
        # a batch that started under a third of INJECT_MS ago is still running when the kill lands
        # (a batch that merely runs may finish between this report and the kill: no retry to see)
        replicas = states(model_deployment("compressed"))
        ages = [s["newest_batch_ms"] for s in replicas if s["pid"] == victim["pid"]]
        return any(age is not None and age < INJECT_MS / 3 for age in ages)

    assert wait_until(victim_busy, 10, 0.005)
    os.kill(victim["pid"], signal.SIGKILL)  # a replica process of the cluster this module started
    killed_at = time.monotonic()
    for worker in workers:
        worker.join(LOAD_S + 60)
    assert not failures, failures[:5]
    assert sum(answered) > 100
    (ingress,) = states(INGRESS)
    assert ingress["retries"].get("compressed", 0) >= 1  # batches in flight on the killed replica

    def back() -> bool:
        deployment = serve.status().applications[APP_NAME].deployments[model_deployment("compressed")]
        fresh = [s for s in states(model_deployment("compressed")) if s["pid"] != victim["pid"]]
        return deployment.replica_states.get("RUNNING") == 2 and len(fresh) == 2

    assert wait_until(back, BACK_WITHIN_S - (time.monotonic() - killed_at), 0.5), states(
        model_deployment("compressed")
    )
    assert all(s["model_version"] == victim["model_version"] for s in states(model_deployment("compressed")))
    metrics = httpx.get(f"{app}/metrics", timeout=30).text
    counted = metric_value(
        metrics, "slimrec_model_retries_total", variant="compressed", reason="ActorDiedError"
    )
    assert counted == ingress["retries"]["compressed"]
