"""Two server processes sharing one real Redis: an event posted to one changes what the other
recommends next, a split change made on one is in force on both, and losing Redis fails
nothing but the events (503), until it is back."""

from __future__ import annotations

import time

import pytest
from redis_server import redis_server_fixture  # noqa: F401 (fixture)
from serving_fixtures import ADMIN_TOKEN, running_server

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
REFRESH_S = 0.2


def items_of(server, user: str = "196", k: int = 20) -> list[str]:
    response = server.client.post("/v1/recommend", json={"user_id": user, "k": k})
    assert response.status_code == 200, response.text
    return [item["item_id"] for item in response.json()["items"]]


def watch(n: int, item: str, user: str = "196") -> dict:
    return {"event_id": f"w{n}", "user_id": user, "item_id": item, "timestamp": 1e9 + n, "type": "watch"}


def eventually(check, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)


@pytest.fixture
def two_servers(tiny_teacher, tmp_path, redis_server):  # noqa: F811 (fixture)
    variants = {"full": tiny_teacher, "compressed": tiny_teacher}
    env = {"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN, "SLIMREC_STATE_REFRESH_S": str(REFRESH_S)}
    args = ("--state", redis_server.url, "--split", "full=50,compressed=50")
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    with (
        running_server(tmp_path / "a", variants, *args, env=env) as a,
        running_server(tmp_path / "b", variants, *args, env=env) as b,
    ):
        yield a, b, redis_server


def test_an_event_posted_to_one_server_changes_the_others_next_answer(two_servers):
    a, b, _ = two_servers
    before = items_of(b)
    assert items_of(a) == before
    response = a.client.post("/v1/events", json={"events": [watch(1, before[0]), watch(2, before[1])]})
    assert response.json()["applied"] == 2, response.text
    after = items_of(b)
    assert not set(before[:2]) & set(after)
    retry = b.client.post("/v1/events", json={"events": [watch(1, before[0])]}).json()
    assert retry["duplicates"] == 1  # retries are recognised across processes too


def test_a_split_change_on_one_server_is_in_force_on_both(two_servers):
    a, b, _ = two_servers
    assert a.client.get("/v1/variants").json()["split_version"] == 1
    response = a.client.put("/admin/split", json={"weights": {"compressed": 100}}, headers=AUTH)
    assert response.json()["version"] == 2, response.text
    described = eventually(lambda: (d := b.client.get("/v1/variants").json())["split_version"] == 2 and d)
    assert described and described["split"] == {"full": 0.0, "compressed": 100.0}
    assert {
        b.client.post("/v1/recommend", json={"user_id": str(u)}).json()["variant"] for u in range(1, 40)
    } == {"compressed"}


def test_losing_redis_refuses_events_but_answers_recommendations(two_servers):
    a, _, redis = two_servers
    watched = items_of(a)[:1]
    assert a.client.post("/v1/events", json={"events": [watch(1, watched[0])]}).json()["applied"] == 1
    redis.stop()
    answer = a.client.post("/v1/recommend", json={"user_id": "196", "k": 20})
    assert answer.status_code == 200  # without the live history: it is in Redis
    refused = a.client.post("/v1/events", json={"events": [watch(2, "50")]})
    assert refused.status_code == 503 and "state store" in refused.json()["detail"]
    assert refused.headers["Retry-After"] == "1"
    metrics = a.client.get("/metrics").text
    assert 'slimrec_events_total{outcome="refused"} 1.0' in metrics
    assert 'slimrec_state_errors_total{op="read_history"}' in metrics
    redis.restart()  # back, empty (nothing persisted): events are accepted again
    retried = eventually(
        lambda: a.client.post("/v1/events", json={"events": [watch(2, "50")]}).status_code == 200
    )
    assert retried
