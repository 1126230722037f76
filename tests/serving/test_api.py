"""End to end against a real `slimrec serve` process: the tiny teacher served as "full" and "compressed".

Both variants are the same artifact, which is honest for routing tests (the server does not
care which is which) and makes shadow agreement exactly 1.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import numpy as np
import pytest
from serving_fixtures import copy_artifact, metric_value, running_server
from slimrec.serving.router import assign_variant

SALT = "test-salt"
SPLIT = {"full": 50.0, "compressed": 50.0}


@pytest.fixture(scope="module")
def artifact(tiny_teacher, tmp_path_factory):
    return copy_artifact(tiny_teacher, tmp_path_factory.mktemp("served") / "teacher")


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    with running_server(
        tmp_path_factory.mktemp("logs"),
        {"full": artifact, "compressed": artifact},
        "--split",
        "full=50,compressed=50",
        "--salt",
        SALT,
        "--shadow-fraction",
        "1",
        "--batch-max-size",
        "16",
        "--batch-max-wait-ms",
        "2",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def catalogue(artifact):
    return json.loads((artifact / "catalogue.json").read_text())


def recommend(server, expect: int = 200, headers: dict | None = None, **body):
    response = server.client.post("/v1/recommend", json=body, headers=headers or {})
    assert response.status_code == expect, response.text
    return response


def genres_of(catalogue, item_id: str) -> set[str]:
    return set(catalogue["genres"][catalogue["item_ids"].index(item_id)].split("|"))


def test_health_readiness_and_variants(server):
    assert server.client.get("/healthz").json() == {"status": "ok"}
    assert server.client.get("/readyz").json()["status"] == "ready"
    listing = server.client.get("/v1/variants").json()
    assert listing["split"] == SPLIT and listing["overrides_allowed"] is True
    names = {v["name"]: v for v in listing["variants"]}
    assert set(names) == {"full", "compressed"}
    summary = names["full"]["summary"]
    assert summary["sizes"]["served_bytes"] > 0 and "promotable" in summary and "metrics" in summary


def test_known_user(server, catalogue):
    response = recommend(server, user_id="196", k=10)
    body = response.json()
    assert body["variant"] == assign_variant("196", SPLIT, SALT)
    assert response.headers["X-Slimrec-Variant"] == body["variant"]
    assert body["fallback"] is None and body["model_version"] and body["request_id"]
    assert len(body["items"]) == 10 and len({i["item_id"] for i in body["items"]}) == 10
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    first = body["items"][0]
    assert first["title"] == catalogue["titles"][catalogue["item_ids"].index(first["item_id"])]
    timing = response.headers["Server-Timing"]
    for stage in ("embed", "retrieve", "rank"):
        assert f"{stage};dur=" in timing


def test_get_endpoint_matches_post(server):
    got = server.client.get("/v1/users/196/recommendations", params={"k": 7}).json()
    posted = recommend(server, user_id="196", k=7).json()
    assert [i["item_id"] for i in got["items"]] == [i["item_id"] for i in posted["items"]]


def test_known_user_history_is_appended_and_excluded(server):
    top = recommend(server, user_id="196", k=5).json()["items"]
    again = recommend(server, user_id="196", k=5, history=[top[0]["item_id"]]).json()
    assert top[0]["item_id"] not in [i["item_id"] for i in again["items"]]
    kept = recommend(server, user_id="196", k=5, history=[top[0]["item_id"]], exclude_seen=False).json()
    assert kept["items"]


def test_new_user_with_history(server):
    history = ["242", "302", "377", "51", "not-an-item"]
    body = recommend(
        server,
        user_id="brand-new-user",
        k=10,
        history=history,
        age=31,
        gender="F",
        occupation="engineer",
        zip_code="94110",
    ).json()
    assert body["fallback"] is None and len(body["items"]) == 10
    assert body["ignored_history"] == ["not-an-item"]
    assert not set(history) & {i["item_id"] for i in body["items"]}  # exclude_seen covers the history


def test_unknown_user_without_history_gets_popular_fallback(server):
    body = recommend(server, user_id="nobody-knows-me", k=5).json()
    assert body["fallback"] == "popular" and len(body["items"]) == 5
    assert all(item["score"] is None for item in body["items"])
    only_unknown = recommend(server, user_id="nobody-2", k=5, history=["x1", "x2"]).json()
    assert only_unknown["fallback"] == "popular" and only_unknown["ignored_history"] == ["x1", "x2"]


def test_genre_filters_are_respected(server, catalogue):
    included = recommend(server, user_id="196", k=20, include_genres=["Comedy"]).json()["items"]
    assert len(included) == 20 and all("Comedy" in genres_of(catalogue, i["item_id"]) for i in included)
    excluded = recommend(server, user_id="196", k=20, exclude_genres=["Drama", "Comedy"]).json()["items"]
    assert len(excluded) == 20
    assert all(not genres_of(catalogue, i["item_id"]) & {"Drama", "Comedy"} for i in excluded)
    fallback = recommend(server, user_id="nobody", k=10, include_genres=["Horror"]).json()
    assert fallback["fallback"] == "popular"
    assert all("Horror" in genres_of(catalogue, i["item_id"]) for i in fallback["items"])
    got = server.client.get(
        "/v1/users/196/recommendations", params={"k": 10, "include_genres": ["War"]}
    ).json()["items"]
    assert got and all("War" in genres_of(catalogue, i["item_id"]) for i in got)


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"user_id": "196", "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({"user_id": "196", "k": 201}, 422, "k: Input should be less than or equal to 200"),
        ({"user_id": "196", "history": ["242", "nope"], "unknown_items": "reject"}, 422, "'nope'"),
        ({"user_id": "196", "history": [str(i) for i in range(1001)]}, 422, "at most 1000"),
        ({"user_id": "196", "include_genres": ["Polka"]}, 422, "unknown genre(s) 'Polka'"),
        ({"user_id": "196", "exclude_seem": True}, 422, "exclude_seem: Extra inputs are not permitted"),
        ({"user_id": 196}, 422, "user_id: Input should be a valid string"),
        ({"k": 5}, 422, "user_id: Field required"),
    ],
)
def test_bad_requests_get_clear_messages(server, body, status, message):
    response = recommend(server, expect=status, **body)
    assert message in response.json()["detail"]


def test_malformed_json_oversized_body_and_bad_query(server):
    bad = server.client.post(
        "/v1/recommend", content=b'{"user_id": "196",', headers={"content-type": "application/json"}
    )
    assert bad.status_code == 400 and "malformed JSON" in bad.json()["detail"]
    oversized = b'{"user_id": "1", "history": ["' + b"x" * 70_000 + b'"]}'
    huge = server.client.post(
        "/v1/recommend", content=oversized, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and "too large" in huge.json()["detail"]
    not_json = server.client.post(
        "/v1/recommend", content=b"user_id=196", headers={"content-type": "application/x-www-form-urlencoded"}
    )
    assert not_json.status_code == 422 and "JSON object" in not_json.json()["detail"]
    get = server.client.get("/v1/users/196/recommendations", params={"k": 500})
    assert get.status_code == 422 and "k:" in get.json()["detail"]


def test_variant_override(server):
    for name in ("full", "compressed"):
        body = recommend(server, headers={"X-Slimrec-Variant": name}, user_id="196").json()
        assert body["variant"] == name
    unknown = recommend(server, expect=400, headers={"X-Slimrec-Variant": "int4"}, user_id="196")
    assert "unknown variant 'int4'" in unknown.json()["detail"]


def test_assignment_is_sticky_over_http(server):
    users = [str(u) for u in range(1, 41)]
    seen = {u: recommend(server, user_id=u, k=1).json()["variant"] for u in users}
    assert seen == {u: assign_variant(u, SPLIT, SALT) for u in users}
    assert {recommend(server, user_id=u, k=1).json()["variant"] for u in users[:5]} <= {"full", "compressed"}
    assert all(recommend(server, user_id=u, k=1).json()["variant"] == seen[u] for u in users[:10])
    assert set(seen.values()) == {"full", "compressed"}


def offline_top10(artifact, raw_user_ids):
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel

    model = ServedModel(load_artifact(artifact))
    catalogue = json.loads((artifact / "catalogue.json").read_text())
    users = np.array([catalogue["user_ids"].index(u) for u in raw_user_ids])
    items = model.recommend(model.known_users(users), 10).items  # what `slimrec evaluate` computes
    return {
        u: [catalogue["item_ids"][i] for i in row if i >= 0]
        for u, row in zip(raw_user_ids, items, strict=True)
    }


def test_http_equals_offline_recommend(server, artifact, catalogue):
    raw = [catalogue["user_ids"][i] for i in range(0, 940, 47)]  # 20 known users
    expected = offline_top10(artifact, raw)

    async def fetch_all(variant):  # concurrently, so the batcher coalesces them
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            responses = await asyncio.gather(
                *(
                    client.post(
                        "/v1/recommend", json={"user_id": u, "k": 10}, headers={"X-Slimrec-Variant": variant}
                    )
                    for u in raw
                )
            )
        return {u: [i["item_id"] for i in r.json()["items"]] for u, r in zip(raw, responses, strict=True)}

    for variant in ("full", "compressed"):
        assert asyncio.run(fetch_all(variant)) == expected
    sequential = {u: [i["item_id"] for i in recommend(server, user_id=u, k=10).json()["items"]] for u in raw}
    assert sequential == expected


def test_metrics_per_variant_batches_and_shadow(server):
    for user in map(str, range(1, 31)):
        recommend(server, user_id=user, k=10)
    deadline = time.monotonic() + 10
    while True:  # shadow comparisons run after the responses are sent
        text = server.client.get("/metrics").text
        compared = sum(
            metric_value(text, "slimrec_shadow_requests_total", primary=p, shadow=s, outcome="compared") or 0
            for p, s in (("full", "compressed"), ("compressed", "full"))
        )
        if compared >= 30 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert compared >= 30
    for variant in ("full", "compressed"):
        assert (
            metric_value(text, "slimrec_requests_total", variant=variant, endpoint="recommend", status="200")
            > 0
        )
        assert metric_value(text, "slimrec_stage_latency_seconds_count", variant=variant, stage="rank") > 0
        assert metric_value(text, "slimrec_batch_size_count", variant=variant) > 0
        assert metric_value(text, "slimrec_model_served_bytes", variant=variant) > 0
        assert f'variant="{variant}"' in text and "slimrec_model_info{" in text
        # The same artifact on both sides: every shadow comparison agrees completely.
        pair = {"primary": variant, "shadow": "compressed" if variant == "full" else "full"}
        count = metric_value(text, "slimrec_shadow_overlap_at_k_count", **pair)
        assert count and metric_value(text, "slimrec_shadow_overlap_at_k_sum", **pair) == count
        assert metric_value(text, "slimrec_shadow_rbo_sum", **pair) == pytest.approx(count)
