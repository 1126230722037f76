"""Observability: JSON log lines from a real `slimrec serve`, the request id in the lines a request
causes, and OpenTelemetry spans (an in-memory exporter) for an in-process app.

The served artifact is the golden one (tests/golden), so nothing trains here.
"""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import copy_artifact, running_server
from slimrec.serving import observability
from slimrec.serving.app import create_app
from slimrec.serving.settings import Settings

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden" / "ml100k-tiny-compressed"
TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def artifact(tmp_path) -> Path:
    return copy_artifact(GOLDEN, tmp_path / "compressed")


@pytest.fixture
def log_lines():
    """What the "slimrec" loggers emit at INFO, formatted as the server would (JSON by default)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(observability.JsonFormatter())
    handler.addFilter(observability.RequestIdFilter())
    logger = logging.getLogger("slimrec")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream, handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def parse_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# --- JSON logs from a real server --------------------------------------------------------------------


def test_a_json_server_writes_only_json_lines_and_one_line_per_request(tmp_path, artifact):
    sent = "client-id-1"
    with running_server(
        tmp_path, {"compressed": artifact}, "--log-level", "info", "--log-format", "json"
    ) as server:
        client = server.client
        first = client.post("/v1/recommend", json={"user_id": "1", "k": 5}, headers={"X-Request-ID": sent})
        second = client.get("/v1/users/5/recommendations", params={"k": 3})
        too_long = client.post("/v1/recommend", json={"user_id": "2"}, headers={"X-Request-ID": "x" * 65})
        refused = client.post(
            "/v1/recommend",
            json={"user_id": "1", "include_genres": ["Polka"]},
            headers={"X-Request-ID": "genre-422"},
        )
        assert client.get("/healthz").status_code == 200  # not a /v1 request: no request line
        assert [r.status_code for r in (first, second, too_long, refused)] == [200, 200, 200, 422]
    text = server.log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line, stdout and stderr alike
    assert len(lines) > 8, text
    for line in lines:
        assert {"ts", "level", "logger", "message"} <= set(line), line
        assert datetime.fromisoformat(line["ts"]).utcoffset().total_seconds() == 0
    loggers = {line["logger"] for line in lines}
    assert {"uvicorn.error", "slimrec.serving", "slimrec.requests"} <= loggers
    assert "uvicorn.access" not in loggers  # replaced by the request lines
    requests = [line for line in lines if line["logger"] == "slimrec.requests"]
    assert [line["request_id"] for line in requests] == [
        sent,
        second.json()["request_id"],
        too_long.json()["request_id"],
        "genre-422",
    ]
    assert second.json()["request_id"] != too_long.json()["request_id"] != "x" * 65  # generated ids
    assert [(line["method"], line["path"], line["status"]) for line in requests] == [
        ("POST", "/v1/recommend", 200),
        ("GET", "/v1/users/{user_id}/recommendations", 200),  # the template: no user id in logs
        ("POST", "/v1/recommend", 200),
        ("POST", "/v1/recommend", 422),
    ]
    body = first.json()
    assert requests[0]["variant"] == body["variant"] == "compressed"
    assert requests[0]["model_version"] == body["model_version"]
    assert requests[0]["fallback"] is None
    assert 0 < requests[0]["latency_ms"] < 30_000
    assert requests[3]["variant"] == "compressed" and "model_version" not in requests[3]  # not answered
    assert any(line["message"] == "Application shutdown complete." for line in lines)  # SIGTERM's lines too


# --- the request id in the lines a request causes ----------------------------------------------------


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_a_model_failure_is_logged_with_the_request_id(artifact, monkeypatch, log_lines, log_format):
    stream, handler = log_lines
    if log_format == "text":
        handler.setFormatter(observability.TextFormatter())
    app = create_app(Settings(variants={"compressed": artifact}, log_format=log_format))
    with TestClient(app) as client:

        def broken(*args, **kwargs):
            raise RuntimeError("injected fault")

        model = app.state.service.variants["compressed"].variant.model
        monkeypatch.setattr(model, "recommend", broken)  # raises on the batching thread
        response = client.post("/v1/recommend", json={"user_id": "1"}, headers={"X-Request-ID": "fault-1"})
    assert response.status_code == 200 and response.json()["fallback"] == "popular"
    if log_format == "text":
        (failure,) = [line for line in stream.getvalue().splitlines() if "model call failed" in line]
        assert failure.startswith("ERROR:     slimrec.serving: ") and failure.endswith("[request_id=fault-1]")
        assert "RuntimeError: injected fault" in stream.getvalue()
        return
    lines = parse_lines(stream.getvalue())
    (failure,) = [line for line in lines if "model call failed" in line["message"]]
    assert failure["level"] == "ERROR" and failure["request_id"] == "fault-1"
    assert "RuntimeError: injected fault" in failure["exc"]  # the traceback, inside the one line
    (request,) = [line for line in lines if line["logger"] == "slimrec.requests"]
    assert request["request_id"] == "fault-1" and request["fallback"] == "popular"
    startup = [line for line in lines if "loaded" in line["message"]]
    assert startup and all("request_id" not in line for line in startup)  # no request, no id


def test_batch_threads_carry_the_ids_they_are_bound_to(log_lines):
    stream, _ = log_lines
    batch_log = logging.getLogger("slimrec.serving")

    def run_batch():
        batch_log.warning("outside any binding")
        with observability.bind_request_ids(["a-1", "b-2"]):
            batch_log.warning("inside the batch")

    token = observability.request_id.set("the-request")
    try:
        thread = threading.Thread(target=run_batch)  # a plain thread starts with a fresh context
        thread.start()
        thread.join()
        batch_log.warning("on the request's own context")
    finally:
        observability.request_id.reset(token)
    outside, inside, own = parse_lines(stream.getvalue())
    assert "request_id" not in outside and "request_ids" not in outside
    assert inside["request_ids"] == ["a-1", "b-2"] and "request_id" not in inside
    assert own["request_id"] == "the-request"


# --- tracing -----------------------------------------------------------------------------------------


@pytest.fixture
def spans():
    """Every span the apps started in this test end, kept in memory."""
    pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the otel extra")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    observability.install_tracer_provider(provider)
    yield exporter
    observability.install_tracer_provider(None)
    provider.shutdown()


def test_a_request_span_continues_the_clients_trace_with_one_span_per_stage(artifact, spans, log_lines):
    stream, _ = log_lines
    app = create_app(Settings(variants={"compressed": artifact}, log_format="json"))
    traceparent = f"00-{TRACE_ID}-{PARENT_ID}-01"
    with TestClient(app) as client:
        response = client.post(
            "/v1/recommend", json={"user_id": "1", "k": 5}, headers={"traceparent": traceparent}
        )
    assert response.status_code == 200
    body = response.json()
    finished = spans.get_finished_spans()
    (server,) = [s for s in finished if s.name == "POST /v1/recommend"]
    assert format(server.context.trace_id, "032x") == TRACE_ID
    assert format(server.parent.span_id, "016x") == PARENT_ID and server.parent.is_remote
    assert server.kind.name == "SERVER"
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "http.route": "/v1/recommend",
        "url.path": "/v1/recommend",
        "http.response.status_code": 200,
        "slimrec.request_id": body["request_id"],
        "slimrec.variant": "compressed",
        "slimrec.model_version": body["model_version"],
        "slimrec.fallback": "none",
        "slimrec.batch_size": 1,
    }
    stages = sorted((s for s in finished if s is not server), key=lambda s: s.start_time)
    assert [s.name for s in stages] == ["queue", "embed", "retrieve", "rank"]
    for stage in stages:
        assert stage.parent.span_id == server.context.span_id
        assert stage.context.trace_id == server.context.trace_id
        assert server.start_time <= stage.start_time <= stage.end_time <= server.end_time
    for earlier, later in zip(stages, stages[1:], strict=False):
        assert earlier.end_time == later.start_time  # laid end to end
    # The stage spans last what the Server-Timing header says (ms, 3 decimals).
    timing = dict(part.split(";dur=") for part in response.headers["server-timing"].split(", "))
    for stage in stages:
        assert abs((stage.end_time - stage.start_time) / 1e6 - float(timing[stage.name])) < 0.01
    (request,) = [line for line in parse_lines(stream.getvalue()) if line["logger"] == "slimrec.requests"]
    assert request["trace_id"] == TRACE_ID  # logs and traces join on it


def test_spans_without_a_traceparent_refusals_and_sampled_out_requests(artifact, spans):
    app = create_app(Settings(variants={"compressed": artifact}))
    with TestClient(app) as client:
        assert client.get("/v1/users/196/recommendations").status_code == 200
        by_user = spans.get_finished_spans()
        spans.clear()
        refused = client.post("/v1/recommend", json={"user_id": "1", "include_genres": ["Polka"]})
        assert refused.status_code == 422
        refusal = spans.get_finished_spans()
        spans.clear()
        not_sampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the client's trace is not recorded
        assert client.post(
            "/v1/recommend", json={"user_id": "1"}, headers={"traceparent": not_sampled}
        ).is_success
        assert client.get("/healthz").status_code == 200  # not traced
        assert spans.get_finished_spans() == ()
    (server,) = [s for s in by_user if s.kind.name == "SERVER"]
    assert server.parent is None  # a new trace
    assert server.name == "GET /v1/users/{user_id}/recommendations"
    assert "196" not in json.dumps(dict(server.attributes))  # no user id in traces
    assert len(by_user) == 5
    (server,) = refusal  # no answer, no stages
    assert (
        server.attributes["http.response.status_code"] == 422
        and "slimrec.model_version" not in server.attributes
    )


def test_the_tracing_rule():
    wanted = observability.tracing_wanted
    assert not wanted(None, {})
    assert wanted(True, {}) and not wanted(False, {"OTEL_TRACES_EXPORTER": "otlp"})
    assert wanted(None, {"OTEL_TRACES_EXPORTER": "console"}) and not wanted(
        None, {"OTEL_TRACES_EXPORTER": "none"}
    )
    assert wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert wanted(None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not wanted(True, {"OTEL_SDK_DISABLED": "true"})


PROBE = """
import importlib.abc, json, logging, os, sys

class NotInstalled(importlib.abc.MetaPathFinder):  # as if the otel extra were not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["opentelemetry", "sdk"], ["opentelemetry", "exporter"]):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

if sys.argv[2] == "without-extra":
    sys.meta_path.insert(0, NotInstalled())
from fastapi.testclient import TestClient
from slimrec.serving.app import create_app
from slimrec.serving.settings import Settings

def traced_modules():
    tracing = ("opentelemetry.sdk.trace", "opentelemetry.exporter")
    return sorted(m for m in sys.modules if m.startswith(tracing))

def serve(**settings):
    app = create_app(Settings(variants={"compressed": sys.argv[1]}, **settings))
    try:
        with TestClient(app) as client:
            return client.post("/v1/recommend", json={"user_id": "1"}).status_code
    except RuntimeError as exc:
        return str(exc)

logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="warning: %(message)s")
outcome = {"off": serve(tracing=False), "imported_when_off": traced_modules()}
os.environ["OTEL_TRACES_EXPORTER"] = "console" if sys.argv[2] == "with-extra" else "otlp"
outcome["asked_by_env"] = serve()
outcome["asked_by_flag"] = serve(tracing=True)
outcome["imported_when_on"] = traced_modules()
print(json.dumps(outcome))
"""


@pytest.mark.parametrize("install", ["with-extra", "without-extra"])
def test_tracing_off_imports_no_tracing_sdk_and_serves_without_the_extra(artifact, install):
    """fastapi itself imports opentelemetry's API; the SDK and the exporter are the otel extra."""
    if install == "with-extra":
        pytest.importorskip("opentelemetry.sdk.trace", reason="tracing needs the otel extra")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(artifact), install],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *printed, last = result.stdout.strip().splitlines()
    outcome = json.loads(last)
    assert outcome["off"] == 200 and outcome["imported_when_off"] == []
    if install == "with-extra":
        assert outcome["asked_by_env"] == 200 and outcome["asked_by_flag"] == 200
        assert "opentelemetry.sdk.trace" in outcome["imported_when_on"]  # the check sees imports
        exported = [json.loads(line) for line in printed]  # the console exporter: a JSON line a span
        assert [span["name"] for span in exported].count("POST /v1/recommend") == 2
        assert {span["resource"]["attributes"]["service.name"] for span in exported} == {"slimrec"}
        return
    warnings = printed
    assert outcome["asked_by_env"] == 200  # an environment asking for traces is a warning
    assert any("OpenTelemetry's SDK is not installed" in w and "tracing off" in w for w in warnings)
    assert "pip install 'slimrec[otel]'" in outcome["asked_by_flag"]  # --tracing refuses to start
