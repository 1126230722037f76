"""A variant failing at run time: its requests fall back to another variant, then to the popularity
list, marked in the response and counted in /metrics, instead of failing.

Faults are injected into an in-process app (the lifespan runs, so both variants are really
loaded): a `ServedModel.recommend` that raises, and a user-tower session swapped for a real
ONNX graph whose output no longer fits the FAISS index (FAISS raises in the middle of a batch).
"""

from __future__ import annotations

import logging

import onnxruntime as ort
import pytest
from fake_models import fake_user_tower
from fastapi.testclient import TestClient
from serving_fixtures import copy_artifact, metric_value
from slimrec.artifact import load_artifact, update_metrics
from slimrec.serving.app import create_app
from slimrec.serving.metrics import Metrics
from slimrec.serving.service import Service
from slimrec.serving.settings import Settings

FULL = {"X-Slimrec-Variant": "full"}


@pytest.fixture
def app(tiny_teacher, tmp_path):
    # Two different artifacts (different model_version), so who answered is visible.
    compressed = copy_artifact(tiny_teacher, tmp_path / "compressed")
    update_metrics(compressed, {"note": "the other variant"})
    application = create_app(
        Settings(variants={"full": tiny_teacher, "compressed": compressed}, batch_max_size=8)
    )
    with TestClient(application) as client:
        application.state.client = client
        yield application


def versions(app) -> dict[str, str]:
    return {name: served.variant.version for name, served in app.state.service.variants.items()}


def break_recommend(app, name: str, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError(f"injected fault in {name}")

    monkeypatch.setattr(app.state.service.variants[name].variant.model, "recommend", broken)


def test_a_failing_variant_falls_back_to_the_other_variant(app, monkeypatch, caplog):
    client, version = app.state.client, versions(app)
    healthy = client.post("/v1/recommend", json={"user_id": "196", "k": 10}, headers=FULL).json()
    assert healthy["fallback"] is None and healthy["model_version"] == version["full"]
    break_recommend(app, "full", monkeypatch)
    with caplog.at_level(logging.ERROR, logger="slimrec.serving"):
        answers = [
            client.post("/v1/recommend", json={"user_id": str(u), "k": 10}, headers=FULL)
            for u in range(190, 200)
        ]
    for response in answers:
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["variant"] == "full"  # the A/B arm the user is in ...
        assert body["fallback"] == "variant:compressed"  # ... and who answered instead
        assert body["model_version"] == version["compressed"]
        assert len(body["items"]) == 10 and all(item["score"] is not None for item in body["items"])
    # Same artifact content underneath: the fallback's answer is what full would have said.
    assert [i["item_id"] for i in answers[6].json()["items"]] == [i["item_id"] for i in healthy["items"]]
    got = client.get("/v1/users/196/recommendations", headers=FULL).json()
    assert got["fallback"] == "variant:compressed"
    logged = [r for r in caplog.records if "model call failed" in r.getMessage()]
    assert len(logged) == 1, "one log line (with the traceback) per 10 s, not one per request"
    text = client.get("/metrics").text
    assert metric_value(text, "slimrec_model_errors_total", variant="full", error="RuntimeError") == 11
    assert metric_value(text, "slimrec_runtime_fallback_total", variant="full", to="variant:compressed") == 11
    assert (
        metric_value(text, "slimrec_requests_total", variant="full", endpoint="recommend", status="200") == 11
    )
    # The healthy variant is untouched.
    other = client.post("/v1/recommend", json={"user_id": "196"}, headers={"X-Slimrec-Variant": "compressed"})
    assert other.json()["fallback"] is None


def test_with_every_variant_failing_the_popularity_list_answers(app, monkeypatch, tiny_teacher):
    client = app.state.client
    break_recommend(app, "full", monkeypatch)
    break_recommend(app, "compressed", monkeypatch)
    body = client.post("/v1/recommend", json={"user_id": "196", "k": 10}, headers=FULL).json()
    assert body["fallback"] == "popular" and body["variant"] == "full"
    assert len(body["items"]) == 10 and all(item["score"] is None for item in body["items"])
    model = app.state.service.variants["full"].variant.model
    seen_user = app.state.service.variants["full"].variant.user_index["196"]
    seen = model.fitted_items[model.fitted_indptr[seen_user] : model.fitted_indptr[seen_user + 1]]
    ids = app.state.service.variants["full"].variant.item_ids
    assert not {ids[i] for i in seen} & {i["item_id"] for i in body["items"]}  # exclude_seen still holds
    filtered = client.post(
        "/v1/recommend", json={"user_id": "196", "include_genres": ["Horror"]}, headers=FULL
    ).json()
    catalogue = load_artifact(tiny_teacher, verify=False).read_json("catalogue.json")
    genres = dict(zip(catalogue["item_ids"], catalogue["genres"], strict=True))
    assert filtered["fallback"] == "popular"
    assert all("Horror" in genres[i["item_id"]] for i in filtered["items"])
    text = client.get("/metrics").text
    assert metric_value(text, "slimrec_runtime_fallback_total", variant="full", to="popular") == 2
    assert metric_value(text, "slimrec_model_errors_total", variant="compressed", error="RuntimeError") == 2


def test_client_errors_are_not_masked_by_the_fallback(app, monkeypatch):
    client = app.state.client
    break_recommend(app, "full", monkeypatch)
    response = client.post(
        "/v1/recommend", json={"user_id": "196", "include_genres": ["Polka"]}, headers=FULL
    )
    assert response.status_code == 422 and "Polka" in response.json()["detail"]
    response = client.post(
        "/v1/recommend", headers=FULL, json={"user_id": "x", "history": ["nope"], "unknown_items": "reject"}
    )
    assert response.status_code == 422


def test_a_broken_onnx_session_fails_mid_batch_and_falls_back(app, tiny_teacher):
    # A real graph, loaded by ONNX Runtime, whose 8-dim output no longer fits the 16-dim index:
    # FAISS raises inside the batch, for every request in it. Every request sends a history, so
    # each runs the tower (a known user without one is answered from the embedding cached at load).
    config = load_artifact(tiny_teacher, verify=False).config["feature_space"]
    tower = fake_user_tower(config["n_users"], config["history_len"], dim=8)
    model = app.state.service.variants["full"].variant.model
    model.user_tower = ort.InferenceSession(tower, providers=["CPUExecutionProvider"])
    client = app.state.client
    for user in ("1", "2", "new-user"):
        body = {"user_id": user, "k": 5, "history": ["50", "181"]}
        answer = client.post("/v1/recommend", json=body, headers=FULL).json()
        assert answer["fallback"] == "variant:compressed" and len(answer["items"]) == 5
    cached = client.post("/v1/recommend", json={"user_id": "1", "k": 5}, headers=FULL).json()
    assert cached["fallback"] is None  # no tower call: its embedding was computed at load
    text = client.get("/metrics").text
    errors = {line for line in text.splitlines() if line.startswith("slimrec_model_errors_total{")}
    assert any('variant="full"' in line for line in errors), errors
    assert metric_value(text, "slimrec_runtime_fallback_total", variant="full", to="variant:compressed") == 3
    # Popularity answers for unknown users never touch the model, so they are not fallbacks.
    plain = client.post("/v1/recommend", json={"user_id": "nobody"}, headers=FULL).json()
    assert plain["fallback"] == "popular" and plain["model_version"] == versions(app)["full"]
    assert (
        metric_value(
            client.get("/metrics").text, "slimrec_runtime_fallback_total", variant="full", to="popular"
        )
        is None
    )


def test_fallback_order_is_name_order_after_the_failing_variant(tiny_teacher):
    service = Service(Settings(variants={"full": tiny_teacher}), Metrics())
    service.variants = dict.fromkeys(["compressed", "full", "int4"])  # names are all it looks at
    assert service.fallback_order("full") == ["int4", "compressed"]
    assert service.fallback_order("int4") == ["compressed", "full"]
    service.variants = dict.fromkeys(["full"])
    assert service.fallback_order("full") == []
