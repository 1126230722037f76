"""`--engine ray` as operators watch it, on a local Ray cluster of its own: JSON log lines naming
the request in the ingress and in the model replica, OpenTelemetry spans continuing the client's
trace (exported where the standard OTEL_* variables say: the console exporter, so they land in the
ingress replica's stdout file in Ray's log directory), model deployments under Ray's autoscaling,
and losing Redis (the shared state store) while serving, then getting it back.

The application: one ingress replica, two variants "a" and "b" (copies of the golden compressed
artifact, so nothing trains), each a model deployment autoscaled between 1 and 2 replicas.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray")  # the ray extra
pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the otel extra")

import ray  # noqa: E402
from ray import serve  # noqa: E402
from ray.serve.context import _get_global_client  # noqa: E402
from ray_cluster import local_ray_cluster, wait_until  # noqa: E402
from redis_server import start_redis  # noqa: E402
from serving_fixtures import ADMIN_TOKEN, copy_artifact, metric_value  # noqa: E402
from slimrec.loadtest.launch import free_port  # noqa: E402
from slimrec.serving.deps import VARIANT_HEADER  # noqa: E402
from slimrec.serving.ray_engine import APP_NAME, INGRESS, build_application  # noqa: E402
from slimrec.serving.ray_models import model_deployment  # noqa: E402
from slimrec.serving.settings import Settings  # noqa: E402

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
TRACE_ID, PARENT_ID = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
OTEL_ENV = {
    "OTEL_TRACES_EXPORTER": "console",
    "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the file soon after the request
    "OTEL_SERVICE_NAME": "slimrec-ray-test",
    "SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN,
}
LINES_WITHIN_S = 30.0


@pytest.fixture(scope="module")
def redis(tmp_path_factory):
    with start_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(scope="module")
def app(tmp_path_factory, redis) -> str:
    work = tmp_path_factory.mktemp("ray-observability")
    port = free_port()
    settings = Settings(
        engine="ray",
        variants={name: copy_artifact(GOLDEN, work / name) for name in ("a", "b")},
        split={"a": 50, "b": 50},
        model_max_replicas=2,  # Ray's autoscaling, from 1 (model_replicas) to 2
        state=redis.url,
        state_refresh_s=0.2,
        port=port,
        state_dir=work / "state",
        event_log=False,
        log_format="json",
        log_level="debug",
        tracing=True,
        admin_token=ADMIN_TOKEN,
    )
    with local_ray_cluster(env=OTEL_ENV):
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_application(settings), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"


def log_files() -> list[Path]:
    """The stdout/stderr files of the cluster's worker processes (Ray writes them under its session)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return sorted(logs.glob("worker-*.out")) + sorted(logs.glob("worker-*.err"))


def json_lines() -> list[dict]:
    """Every JSON object line the workers wrote (Ray's own lines are not JSON and are skipped)."""
    found = []
    for path in log_files():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line being written
    return found


def recommend(client: httpx.Client, user: str, request_id: str, variant: str | None = None, **headers):
    if variant is not None:
        headers[VARIANT_HEADER] = variant
    return client.post(
        "/v1/recommend", json={"user_id": user, "k": 5}, headers={"X-Request-ID": request_id, **headers}
    )


def test_the_model_deployments_run_under_rays_autoscaling(app):
    # What Serve's controller deployed (the REST API's details; the dashboard is off here).
    details = _get_global_client().get_serve_details()["applications"][APP_NAME]["deployments"]
    for name in ("a", "b"):
        deployment = details[model_deployment(name)]
        assert deployment["status"] == "HEALTHY"
        autoscaling = deployment["deployment_config"]["autoscaling_config"]
        assert (autoscaling["min_replicas"], autoscaling["max_replicas"]) == (1, 2)
        assert autoscaling["target_ongoing_requests"] == 2.0
        assert 1 <= len(deployment["replicas"]) <= 2
    ingress = details[INGRESS]
    assert ingress["deployment_config"].get("autoscaling_config") is None  # a fixed count
    assert ingress["deployment_config"]["num_replicas"] == 1


def test_json_lines_name_the_request_in_the_ingress_and_in_the_model_replica(app):
    ids = {f"obs-{variant}-{uuid.uuid4().hex[:8]}": variant for variant in ("a", "b")}
    with httpx.Client(base_url=app, timeout=30) as client:
        for request_id, variant in ids.items():
            response = recommend(client, "1", request_id, variant)
            assert response.status_code == 200, response.text
            assert response.headers["X-Request-ID"] == request_id

    def lines_for_every_request():
        lines = json_lines()
        requests = {
            line["request_id"]: line
            for line in lines
            if line.get("logger") == "slimrec.requests" and line.get("request_id") in ids
        }
        batches = {
            rid: line
            for line in lines
            if "a batch of" in line.get("message", "")
            for rid in line.get("request_ids", [])
            if rid in ids
        }
        return (requests, batches) if len(requests) == len(batches) == len(ids) else None

    found = wait_until(lines_for_every_request, LINES_WITHIN_S, 0.5)
    assert found, f"no JSON request and model-replica lines for {sorted(ids)} in {LINES_WITHIN_S:.0f} s"
    requests, batches = found
    for request_id, variant in ids.items():
        request = requests[request_id]
        assert request["variant"] == variant and request["status"] == 200 and request["fallback"] is None
        assert request["model_version"] and 0 < request["latency_ms"] < 30_000
        batch = batches[request_id]  # written by the model replica's process, not the ingress's
        assert batch["logger"] == "slimrec.serving" and batch["level"] == "DEBUG"
        assert f"of {variant}:" in batch["message"] and request["model_version"] in batch["message"]
        assert {"ts", "level", "logger", "message"} <= set(batch)


def test_a_client_traceparent_is_continued_on_ray_with_one_span_per_stage(app):
    with httpx.Client(base_url=app, timeout=30) as client:
        response = recommend(
            client, "2", f"trace-{uuid.uuid4().hex[:8]}", traceparent=f"00-{TRACE_ID}-{PARENT_ID}-01"
        )
    assert response.status_code == 200

    def spans_of_the_trace():
        spans = [line for line in json_lines() if line.get("context", {}).get("trace_id") == f"0x{TRACE_ID}"]
        return spans if len(spans) >= 5 else None

    spans = wait_until(spans_of_the_trace, LINES_WITHIN_S, 0.5)
    assert spans, f"no spans of trace {TRACE_ID} exported in {LINES_WITHIN_S:.0f} s"
    (server,) = [s for s in spans if s["name"] == "POST /v1/recommend"]
    assert server["parent_id"] == f"0x{PARENT_ID}" and server["kind"] == "SpanKind.SERVER"
    assert server["attributes"]["slimrec.request_id"] == response.json()["request_id"]
    assert server["resource"]["attributes"]["service.name"] == "slimrec-ray-test"
    stages = [s for s in spans if s is not server]
    assert sorted(s["name"] for s in stages) == sorted(["queue", "embed", "retrieve", "rank"])
    assert all(s["parent_id"] == server["context"]["span_id"] for s in stages)


def test_losing_redis_keeps_answering_with_the_last_split_and_refuses_events_until_it_returns(app, redis):
    with httpx.Client(base_url=app, timeout=30) as client:
        put = client.put("/admin/split", json={"weights": {"a": 100, "b": 0}}, headers=AUTH)
        assert put.status_code == 200, put.text

        def answered_by(n: int, prefix: str) -> list[str]:
            variants = []
            for i in range(n):
                response = recommend(client, str(1 + i % 900), f"{prefix}-{i}")
                assert response.status_code == 200, response.text
                variants.append(response.json()["variant"])
            return variants

        assert wait_until(lambda: set(answered_by(20, "before")) == {"a"}, 20, 0.2)
        item = recommend(client, "1", "item").json()["items"][0]["item_id"]
        event = {"event_id": "", "user_id": "7", "item_id": item, "timestamp": 1.0, "type": "rating"}

        redis.stop()
        # Answered as before: the split is the last one read, histories are the stored ones.
        assert set(answered_by(40, "down")) == {"a"}
        refused = client.post("/v1/events", json={"events": [{**event, "event_id": "down-1"}]})
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "1"
        assert "state store unreachable" in refused.json()["detail"]
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "slimrec_events_total", outcome="refused") >= 1
        assert client.get("/readyz").status_code == 200  # nothing crashed

        redis.restart()  # same port, empty
        accepted = wait_until(
            lambda: (
                client.post("/v1/events", json={"events": [{**event, "event_id": "back-1"}]}).status_code
                == 200
            ),
            30,
            0.5,
        )
        assert accepted, "events still refused 30 s after Redis returned"
        put = client.put("/admin/split", json={"weights": {"a": 0, "b": 100}}, headers=AUTH)
        assert put.status_code == 200, put.text
        assert wait_until(lambda: set(answered_by(20, "after")) == {"b"}, 20, 0.2)
