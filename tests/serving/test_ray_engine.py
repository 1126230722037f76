"""`--engine ray` on a local Ray cluster (2 CPUs, started once for the module), deployed the way an
operator would: `slimrec serve --engine ray --print-config` writes the Serve config and Ray's own
CLI (`serve run --non-blocking CONFIG`) deploys it.

The application: 2 ingress replicas sharing a real Redis (split, live histories), the compressed
variant (the golden compressed artifact) on 2 model replicas, the full one (the tiny teacher) on 1.
Answers are compared with the embedded server's (the same app in this process) for every ml-100k
user, A/B assignment with the router for 2,000 users; a split change and a reload (and a refused
one) are checked on every replica through Ray's DeploymentHandle.broadcast. `kill -9` of a model
replica under load: tests/serving/test_ray_faults.py.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

ray = pytest.importorskip("ray")  # the ray extra

from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402
from ray_cluster import SERVE_CLI, local_ray_cluster, print_config, wait_until  # noqa: E402
from redis_server import start_redis  # noqa: E402
from serving_fixtures import ADMIN_TOKEN, copy_artifact, metric_value  # noqa: E402
from slimrec.loadtest.launch import free_port  # noqa: E402
from slimrec.serving.app import create_app  # noqa: E402
from slimrec.serving.deps import VARIANT_HEADER  # noqa: E402
from slimrec.serving.queries import build_query  # noqa: E402
from slimrec.serving.ray_engine import APP_NAME, INGRESS  # noqa: E402
from slimrec.serving.ray_models import RayRunner, VersionUnavailable, cause_of, model_deployment  # noqa: E402
from slimrec.serving.router import assign_variant  # noqa: E402
from slimrec.serving.settings import Settings  # noqa: E402
from slimrec.serving.variants import load_variant  # noqa: E402

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
DEPLOY_TIMEOUT_S = 300.0
CLIENT_THREADS = 8


@pytest.fixture(scope="module")
def artifacts(tiny_teacher, tmp_path_factory) -> dict[str, Path]:
    """The served artifacts, one to reload to, and a tampered one, under one artifacts root."""
    root = tmp_path_factory.mktemp("artifacts")
    paths = {
        "compressed": copy_artifact(GOLDEN, root / "compressed"),
        "full": copy_artifact(tiny_teacher, root / "full"),
        "reload": copy_artifact(tiny_teacher, root / "teacher-again"),
        "tampered": copy_artifact(GOLDEN, root / "tampered"),
    }
    with open(paths["tampered"] / "ranker.onnx", "ab") as graph:
        graph.write(b"\0")
    return paths


@pytest.fixture(scope="module")
def cluster():
    # The application is built on the cluster (Serve's build task): its workers need the token.
    with local_ray_cluster(env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN}) as address:
        yield address


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def app(cluster, artifacts, redis, tmp_path_factory) -> str:
    """The application deployed from the printed config by `serve run`; yields its URL."""
    work = tmp_path_factory.mktemp("ray-app")
    port = free_port()
    config = print_config(
        *("--variant", f"full={artifacts['full']}", "--variant", f"compressed={artifacts['compressed']}"),
        *("--split", "full=50,compressed=50", "--state", redis.url, "--state-dir", str(work / "state")),
        *("--ingress-replicas", "2", "--model-replicas", "compressed=2,full=1"),
        *("--port", str(port), "--log-level", "warning"),
        env={"SLIMREC_STATE_REFRESH_S": "0.2"},
    )
    (work / "serve.yaml").write_text(config)
    deployed = subprocess.run(
        [str(SERVE_CLI), "run", "--non-blocking", "--address", cluster, str(work / "serve.yaml")],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    url = f"http://127.0.0.1:{port}"
    running = wait_until(lambda: app_status() == "RUNNING" and ready(url), DEPLOY_TIMEOUT_S, 1.0)
    assert running, f"not running after {DEPLOY_TIMEOUT_S:.0f} s: {serve.status()}"
    return url


@pytest.fixture(scope="module")
def embedded(artifacts, tmp_path_factory):
    """The embedded server (this process, no Ray) on the same artifacts."""
    settings = Settings(
        variants={"full": artifacts["full"], "compressed": artifacts["compressed"]},
        split={"full": 50, "compressed": 50},
        state_dir=tmp_path_factory.mktemp("embedded-state"),
        event_log=False,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def app_status() -> str | None:
    application = serve.status().applications.get(APP_NAME)
    return application.status if application else None


def ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def states(deployment: str) -> list[dict]:
    """`state()` of every running replica of a deployment (Ray's broadcast)."""
    handle = serve.get_deployment_handle(deployment, APP_NAME)
    outcomes = handle.broadcast("state").results(timeout_s=30, return_exceptions=True)
    return [outcome for outcome in outcomes if isinstance(outcome, dict)]


def in_parallel(work, items: list, threads: int = CLIENT_THREADS) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(work, items))


def client_pool(url: str):
    """A per-thread httpx client (connections reused within a thread)."""
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=url, timeout=30)
        return local.client

    return client


def test_every_user_gets_the_embedded_servers_lists(app, embedded, artifacts):
    """Both variants, every user, k=200. The compressed variant's int8 ranker quantizes its inputs
    per batch, so its answers depend on what shares the batch (in the embedded server too): it is
    asked one request at a time, as the embedded server is; the full one by CLIENT_THREADS at once."""
    users = [str(u) for u in json.loads((artifacts["compressed"] / "catalogue.json").read_text())["user_ids"]]
    client = client_pool(app)

    def ask(variant: str):
        def over_ray(user: str) -> dict:
            body, headers = {"user_id": user, "k": 200}, {VARIANT_HEADER: variant}
            response = client().post("/v1/recommend", json=body, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()

        return over_ray

    for variant, threads in (("compressed", 1), ("full", CLIENT_THREADS)):
        got = in_parallel(ask(variant), users, threads)
        for user, answer in zip(users, got, strict=True):
            body, headers = {"user_id": user, "k": 200}, {VARIANT_HEADER: variant}
            want = embedded.post("/v1/recommend", json=body, headers=headers).json()
            for key in ("variant", "model_version", "user_id", "fallback", "ignored_history"):
                assert answer[key] == want[key], (variant, user, key)
            for key in ("item_id", "title"):
                assert [i[key] for i in answer["items"]] == [i[key] for i in want["items"]], (variant, user)
            # lone and batched float answers agree to rounding (tests/serving/test_batcher.py)
            np.testing.assert_allclose(
                [i["score"] for i in answer["items"]],
                [i["score"] for i in want["items"]],
                rtol=1e-5,
                atol=1e-5,
            )
        assert len(got) == 943 and all(len(a["items"]) == 200 for a in got)


def test_routes_schemas_and_errors_are_the_embedded_servers(app, embedded):
    with httpx.Client(base_url=app, timeout=30) as client:
        assert client.get("/openapi.json").json() == embedded.get("/openapi.json").json()
        for method, path, body, headers in [
            ("POST", "/v1/recommend", {"user_id": "196", "k": 0}, {}),
            ("POST", "/v1/recommend", {"user_id": "196", "typo": 1}, {}),
            ("POST", "/v1/recommend", {"user_id": "196"}, {VARIANT_HEADER: "nope"}),
            ("GET", "/v1/users/196/recommendations?include_genres=Nope", None, {}),
            ("GET", "/v1/nothing-here", None, {}),
        ]:
            got = client.request(method, path, json=body, headers=headers)
            want = embedded.request(method, path, json=body, headers=headers)
            assert (got.status_code, got.json()) == (want.status_code, want.json()), path
        answer = client.get("/v1/users/196/recommendations", params={"k": 3})
        assert answer.headers.get_list("x-request-id") == [answer.json()["request_id"]]  # sent once
        assert answer.headers[VARIANT_HEADER] == answer.json()["variant"]
        assert {"queue", "embed", "retrieve", "rank", "total"} <= {
            part.split(";")[0] for part in answer.headers["server-timing"].split(", ")
        }


def test_ab_assignment_is_the_routers_for_2000_users(app):
    described = httpx.get(f"{app}/v1/variants", timeout=30).json()
    split, salt = described["split"], "slimrec-ab-1"
    client = client_pool(app)

    def variant_of(user: str) -> tuple[str, str]:
        response = client().get(f"/v1/users/{user}/recommendations", params={"k": 1})
        assert response.status_code == 200, response.text
        return response.json()["variant"], response.headers[VARIANT_HEADER]

    users = [str(u) for u in range(1, 2001)]  # 943 known users, then new ones (popularity fallback)
    got = in_parallel(variant_of, users)
    expected = [assign_variant(user, split, salt) for user in users]
    assert [body for body, _ in got] == expected
    assert [header for _, header in got] == expected
    assert {"full", "compressed"} == set(expected)


def requests_counted(text: str) -> float:
    """slimrec_requests_total summed over every label set."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("slimrec_requests_total{")
    )


def test_metrics_from_any_ingress_replica_count_every_replica(app):
    before = requests_counted(httpx.get(f"{app}/metrics", timeout=30).text)
    with httpx.Client(base_url=app, timeout=30) as client:
        for user in range(1, 101):
            assert client.get(f"/v1/users/{user}/recommendations").status_code == 200
    for _ in range(4):  # Serve's proxy sends each scrape to either ingress replica
        text = httpx.get(f"{app}/metrics", timeout=30).text
        replicas = {
            line.split('pid="')[1].split('"')[0]
            for line in text.splitlines()
            if "slimrec_model_info{" in line
        }
        assert len(replicas) == 2, "the scrape does not see both ingress replicas"
        assert requests_counted(text) - before == 100
    # The node's CPU time: both ingress replicas and the 3 model replicas add theirs every second.
    pids = {int(pid) for pid in replicas} | {
        row["pid"] for name in ("compressed", "full") for row in states(model_deployment(name))
    }
    assert len(pids) == 5
    used = sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)
    time.sleep(1.5)
    exported = metric_value(httpx.get(f"{app}/metrics", timeout=30).text, "slimrec_process_cpu_seconds_total")
    assert exported is not None and exported >= used - 0.2, (exported, used)


def test_a_split_change_is_in_force_on_every_ingress_replica(app):
    response = httpx.put(
        f"{app}/admin/split", json={"weights": {"compressed": 100}}, headers=AUTH, timeout=30
    )
    assert response.status_code == 200, response.text
    version = response.json()["version"]
    try:

        def everywhere():
            replicas = states(INGRESS)
            in_force = [s for s in replicas if s["split_version"] == version]
            return len(replicas) == 2 and len(in_force) == 2 and replicas

        replicas = wait_until(everywhere, 10)
        assert replicas, states(INGRESS)
        assert all(s["split"] == {"full": 0.0, "compressed": 100.0} for s in replicas)
        with httpx.Client(base_url=app, timeout=30) as client:
            routed = {client.get(f"/v1/users/{u}/recommendations").json()["variant"] for u in range(1, 60)}
        assert routed == {"compressed"}
    finally:
        restored = httpx.put(
            f"{app}/admin/split", json={"weights": {"full": 50, "compressed": 50}}, headers=AUTH
        )
        assert restored.status_code == 200


def test_a_reload_is_rolled_to_every_replica_and_a_refused_one_to_none(app, artifacts):
    replicas_of = lambda described: next(  # noqa: E731
        v["replicas"] for v in described["variants"] if v["name"] == "compressed"
    )
    old = next(v for v in httpx.get(f"{app}/v1/variants").json()["variants"] if v["name"] == "compressed")
    response = httpx.post(
        f"{app}/admin/variants/compressed/reload",
        json={"path": str(artifacts["reload"]), "force": True},
        headers=AUTH,
        timeout=120,
    )
    assert response.status_code == 200, response.text
    new = response.json()["model_version"]
    assert new != old["model_version"] and response.json()["previous_version"] == old["model_version"]
    # Every model replica serves the new version (and holds the old one for batches in flight) ...
    replicas = states(model_deployment("compressed"))
    assert len(replicas) == 2 and all(r["model_version"] == new for r in replicas), replicas
    assert all(set(r["versions"]) == {new, old["model_version"]} for r in replicas)
    # ... the other ingress replica follows, and /v1/variants shows every model replica's version.
    followed = wait_until(lambda: all(s["model_versions"]["compressed"] == new for s in states(INGRESS)), 10)
    assert followed, states(INGRESS)

    def shown_by_every_ingress() -> bool:  # 6 answers: both ingress replicas answer some
        shown = [replicas_of(httpx.get(f"{app}/v1/variants").json()) for _ in range(6)]
        return all([r["model_version"] for r in rows] == [new, new] for rows in shown)

    assert wait_until(shown_by_every_ingress, 10)
    with httpx.Client(base_url=app, timeout=30) as client:
        answers = [
            client.post(
                "/v1/recommend", json={"user_id": str(u)}, headers={VARIANT_HEADER: "compressed"}
            ).json()
            for u in range(1, 30)
        ]
    assert {a["model_version"] for a in answers} == {new}

    refused = httpx.post(
        f"{app}/admin/variants/compressed/reload",
        json={"path": str(artifacts["tampered"]), "force": True},
        headers=AUTH,
        timeout=120,
    )
    assert refused.status_code == 422 and "ranker.onnx" in refused.json()["detail"], refused.text
    assert all(r["model_version"] == new for r in states(model_deployment("compressed")))
    assert all(s["model_versions"]["compressed"] == new for s in states(INGRESS))


def test_a_model_replica_refuses_a_version_it_cannot_load_and_keeps_serving(app, artifacts):
    """The replicas' side of a refused roll: an artifact that is not the version named is refused
    by every replica, which goes on serving what it served."""
    handle = serve.get_deployment_handle(model_deployment("full"), APP_NAME)
    before = states(model_deployment("full"))
    outcomes = handle.broadcast("prepare", str(artifacts["compressed"]), "full-000000000000").results(
        timeout_s=120, return_exceptions=True
    )
    assert outcomes and all(
        isinstance(o, Exception) and "validated full-000000000000" in str(o) for o in outcomes
    )
    assert states(model_deployment("full")) == before


def test_a_batch_for_a_version_no_replica_holds_is_sent_again_once_then_fails(app, artifacts):
    """A replica lacking the batch's version refuses it (VersionUnavailable); the runner sends it
    again once (another replica may hold it), then the error is the batch's (requests fall back)."""
    variant = load_variant("full", artifacts["full"])
    retried = []
    runner = RayRunner(
        serve.get_deployment_handle(model_deployment("full"), APP_NAME),
        "full",
        "full-000000000000",
        lambda name, exc: retried.append((name, type(cause_of(exc)).__name__)),
    )
    with pytest.raises(Exception) as refused:
        runner.run([build_query(variant, "196", 10)], 200)
    assert isinstance(cause_of(refused.value), VersionUnavailable)
    assert retried == [("full", "VersionUnavailable")]
    held = RayRunner(runner.handle, "full", variant.version, lambda name, exc: retried.append(name))
    (answer,) = held.run([build_query(variant, "196", 10)], 200)
    assert len(answer.items) == 10 and len(retried) == 1
