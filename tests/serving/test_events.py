"""Events in, histories live, outcomes logged, the split stored: against the real app and real
servers (in-process state; the Redis-shared state is in test_shared_state.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import ADMIN_TOKEN, running_server
from slimrec.serving.app import create_app
from slimrec.serving.eventlog import read_log
from slimrec.serving.settings import Settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER = "196"


def event(n: int, item: str, user: str = USER, type: str = "watch", **extra) -> dict:
    return {
        "event_id": f"e{n}",
        "user_id": user,
        "item_id": item,
        "timestamp": 1e9 + n,
        "type": type,
        **extra,
    }


def items_of(client, user: str = USER, k: int = 20, **body) -> list[str]:
    response = client.post("/v1/recommend", json={"user_id": user, "k": k, **body})
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def post_events(client, *events, expect: int = 200) -> dict:
    response = client.post("/v1/events", json={"events": list(events)})
    assert response.status_code == expect, response.text
    return response.json()


@pytest.fixture
def app_settings(tiny_teacher, state_dir):
    def build(**overrides) -> Settings:
        return Settings(variants={"full": tiny_teacher}, state_dir=state_dir, **overrides)

    return build


def test_an_event_changes_the_next_recommendation_and_retries_apply_once(app_settings):
    with TestClient(create_app(app_settings())) as client:
        before = items_of(client)
        watched = before[:3]
        answer = post_events(client, *(event(n, item) for n, item in enumerate(watched)))
        assert answer == {
            "received": 3,
            "applied": 3,
            "duplicates": 0,
            "unknown_items": 0,
            "not_in_history": 0,
        }
        after = items_of(client)
        assert not set(watched) & set(after)  # exclude_seen sees the live history
        assert (
            items_of(client, exclude_seen=False) != before
        )  # the model reads the history, not only the filter
        retry = post_events(client, event(0, watched[0]), event(7, before[5]))
        assert (retry["applied"], retry["duplicates"]) == (1, 1)
        metrics = client.get("/metrics").text
        assert 'slimrec_events_total{outcome="applied"} 4.0' in metrics
        assert 'slimrec_events_total{outcome="duplicate"} 1.0' in metrics
        assert 'slimrec_live_history{stat="users"} 1.0' in metrics
        assert "slimrec_split_version 1.0" in metrics


def test_unknown_items_and_other_types_are_logged_not_learned(app_settings, state_dir):
    with TestClient(create_app(app_settings(history_event_types=["watch"]))) as client:
        before = items_of(client)
        answer = post_events(
            client, event(1, "no-such-item"), event(2, before[0], type="impression"), event(3, before[1])
        )
        assert (answer["applied"], answer["unknown_items"], answer["not_in_history"]) == (1, 1, 1)
        after = items_of(client)
        assert before[0] in after and before[1] not in after
    logged = [r for r in read_log(state_dir / "logs").records if r["kind"] == "event"]
    assert {(r["event_id"], r["known_item"], r["in_history"]) for r in logged} == {
        ("e1", False, False),
        ("e2", True, False),
        ("e3", True, True),
    }


def test_a_new_user_is_served_from_their_events(app_settings):
    with TestClient(create_app(app_settings())) as client:
        response = client.post("/v1/recommend", json={"user_id": "someone-new", "k": 5})
        assert response.json()["fallback"] == "popular"
        post_events(client, event(1, "50", user="someone-new"), event(2, "181", user="someone-new"))
        response = client.post("/v1/recommend", json={"user_id": "someone-new", "k": 5}).json()
        assert response["fallback"] is None
        assert not {"50", "181"} & {item["item_id"] for item in response["items"]}


def test_a_sent_history_is_for_that_request_only(app_settings):
    with TestClient(create_app(app_settings())) as client:
        before = items_of(client)
        assert before[0] not in items_of(client, history=[before[0]])
        assert items_of(client) == before


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"events": []}, 422, "events"),
        ({"events": [{"event_id": "x", "user_id": USER, "item_id": "1", "type": "watch"}]}, 422, "timestamp"),
        ({"events": [{**event(1, "1"), "timestamp": -5}]}, 422, "timestamp"),
        ({"events": [{**event(1, "1"), "timestamp": "yesterday"}]}, 422, "timestamp"),
        ({"events": [{**event(1, "1"), "colour": "red"}]}, 422, "colour"),
        ({"events": [event(n, "1") for n in range(11)]}, 422, "at most 10"),
    ],
)
def test_bad_event_batches_are_refused_with_the_reason(app_settings, body, status, needle):
    with TestClient(create_app(app_settings(max_events_per_request=10))) as client:
        response = client.post("/v1/events", json=body)
        assert response.status_code == status, response.text
        assert needle in response.text


def test_event_batches_have_their_own_body_limit(app_settings):
    with TestClient(create_app(app_settings(max_events_body_bytes=4096))) as client:
        batch = {"events": [event(n, "1") for n in range(60)]}  # ~6 KB: over 4 KiB, under 64 KiB
        assert client.post("/v1/events", json=batch).status_code == 413
        assert client.post("/v1/events", json={"events": batch["events"][:20]}).status_code == 200


def test_exposures_are_logged_with_arm_version_split_and_the_requests_clock(app_settings, state_dir):
    with TestClient(create_app(app_settings())) as client:
        response = client.post("/v1/recommend", json={"user_id": USER, "k": 4, "timestamp": 881250949}).json()
        client.post("/v1/recommend", json={"user_id": "someone-new", "k": 3})
    records = read_log(state_dir / "logs").records
    exposures = [r for r in records if r["kind"] == "exposure"]
    assert len(exposures) == 2
    first = exposures[0]
    assert first["request_id"] == response["request_id"] and first["time"] == 881250949
    assert (first["arm"], first["variant"], first["model_version"]) == (
        "full",
        "full",
        response["model_version"],
    )
    assert [i["item_id"] for i in first["items"]] == [i["item_id"] for i in response["items"]]
    assert [i["position"] for i in first["items"]] == [1, 2, 3, 4] and first["split_version"] == 1
    assert exposures[1]["fallback"] == "popular"
    splits = [r for r in records if r["kind"] == "split"]
    assert [(s["version"], s["source"]) for s in splits] == [(1, "startup")]


def test_logging_off_writes_nothing(app_settings, state_dir):
    with TestClient(create_app(app_settings(event_log=False))) as client:
        items_of(client)
        post_events(client, event(1, "50"))
    assert not list((state_dir / "logs").glob("*.jsonl"))


def test_histories_and_the_split_survive_a_restart(tiny_teacher, tmp_path):
    """Real servers: events and an admin split change before a restart are in force after it;
    the stored split wins over --split, and the restarted server writes new log segments."""
    state = tmp_path / "state"
    variants = {"full": tiny_teacher, "compressed": tiny_teacher}
    env = {"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN, "SLIMREC_STATE_DIR": str(state)}
    with running_server(tmp_path, variants, "--split", "full=50,compressed=50", env=env) as server:
        before = items_of(server.client)
        post_events(server.client, *(event(n, item) for n, item in enumerate(before[:2])))
        response = server.client.put("/admin/split", json={"weights": {"full": 100}}, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json() == {"split": {"full": 100.0, "compressed": 0.0}, "version": 2}
    segments = {p: p.read_bytes() for p in (state / "logs").glob("*.jsonl")}
    restart = ("--split", "full=10,compressed=90", "--log-level", "info")
    with running_server(tmp_path, variants, *restart, env=env) as server:
        assert not set(before[:2]) & set(items_of(server.client))
        described = server.client.get("/v1/variants").json()
        assert (described["split"], described["split_version"]) == ({"full": 100.0, "compressed": 0.0}, 2)
        assert "split v2 from this process in force (stored" in server.log()
        items_of(server.client)
    assert all(path.read_bytes() == data for path, data in segments.items())  # old segments untouched
    assert len(list((state / "logs").glob("*.jsonl"))) > len(segments)
    exposures = [r for r in read_log(state / "logs").records if r["kind"] == "exposure"]
    assert [r["split_version"] for r in exposures] == [1, 2, 2]
