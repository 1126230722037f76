"""Bad input against the HTTP API (the schema-driven part is tests/fuzz/test_openapi.py).

- hypothesis on request parsing, in-process (lifespan runs): any JSON (or not-JSON) body is
  a 200 or a 400/413/422 whose `detail` is a readable line; each field's bounds exactly.
- Hostile bodies (oversized, 60 KB histories, deeply nested JSON, huge k) in a concurrent
  burst against a real server: each refused fast, and the server's RSS stays flat.
"""

from __future__ import annotations

import asyncio
import json
import time
from urllib.parse import quote

import httpx
import psutil
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_fixtures import ADMIN_TOKEN, copy_artifact, running_server
from slimrec.serving.app import create_app
from slimrec.serving.settings import Settings

ERROR_STATUSES = {400, 413, 422}


# --- real server (hostile bodies) ----------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_server(tiny_teacher, tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    artifact = copy_artifact(tiny_teacher, base / "artifacts" / "v1")
    variants = {"full": artifact, "compressed": artifact}
    with running_server(base, variants, "--salt", "fuzz", env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN}) as srv:
        yield srv


# --- hypothesis on request parsing (in-process) ------------------------------------------------


@pytest.fixture(scope="module")
def client(tiny_teacher):
    app = create_app(Settings(variants={"full": tiny_teacher}, max_history=50))
    with TestClient(app) as test_client:
        yield test_client


FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
FIELDS = {
    "user_id": st.text(max_size=140) | JSON_VALUES,
    "k": st.integers(-10, 400) | st.integers() | JSON_VALUES,
    "exclude_seen": st.booleans() | JSON_VALUES,
    "history": st.lists(st.text(max_size=8), max_size=60) | JSON_VALUES,
    "unknown_items": st.sampled_from(["ignore", "reject", "Ignore"]) | JSON_VALUES,
    "age": st.integers(-5, 200) | JSON_VALUES,
    "include_genres": st.lists(st.sampled_from(["Drama", "Comedy", "Polka", ""]), max_size=3) | JSON_VALUES,
    "typo_field": JSON_VALUES,
}


def assert_clear_error(response) -> dict:
    assert response.status_code in ERROR_STATUSES, (response.status_code, response.text)
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"].strip(), body
    return body


@FUZZ
@given(body=st.fixed_dictionaries({}, optional=FIELDS))
def test_any_request_object_is_answered_or_refused_with_a_message(client, body):
    response = client.post("/v1/recommend", json=body)
    if response.status_code == 200:
        answer = response.json()
        k = body.get("k", 10)
        assert type(k) is int and 1 <= k <= 200 and len(answer["items"]) <= k
        assert isinstance(body.get("user_id"), str) and "typo_field" not in body
        return
    error = assert_clear_error(response)
    if response.status_code == 422 and "typo_field" in body and len(error.get("errors") or []) < 10:
        assert "typo_field" in error["detail"]  # named, unless crowded out of the first 10 errors


@FUZZ
@given(
    k=st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.booleans()
    | st.text(max_size=5)
    | st.none()
)
def test_k_is_an_integer_from_1_to_200(client, k):
    response = client.post("/v1/recommend", json={"user_id": "196", "k": k})
    if type(k) is int and 1 <= k <= 200:
        assert response.status_code == 200 and len(response.json()["items"]) == k
    else:  # no coercion: true, "10" and 10.0 are refused, not read as 1 or 10
        assert response.status_code == 422 and "k:" in response.json()["detail"]


@FUZZ
@given(history=st.lists(st.text(min_size=0, max_size=130), max_size=80))
def test_history_length_and_ids_are_bounded(client, history):
    response = client.post("/v1/recommend", json={"user_id": "new-user", "history": history})
    bad_id = any(not 1 <= len(item) <= 128 for item in history)
    if bad_id:
        assert response.status_code == 422 and "history." in response.json()["detail"]
    elif len(history) > 50:  # max_history of this app
        assert response.status_code == 422 and "at most 50" in response.json()["detail"]
    else:
        assert response.status_code == 200, response.text


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_are_a_400_or_422(client, raw):
    response = client.post("/v1/recommend", content=raw, headers={"content-type": "application/json"})
    if response.status_code != 200:  # a few byte strings are valid requests ({"user_id": "0"})
        assert_clear_error(response)


@FUZZ
@given(user_id=st.text(min_size=1, max_size=200))
def test_any_user_id_in_the_path(client, user_id):
    # Percent-encoded; ids holding "/" are routed too. A whole id of "." or ".." is resolved away by
    # the client's path normalisation ("/v1/users/./recommendations"): no route, 404.
    response = client.get(f"/v1/users/{quote(user_id, safe='')}/recommendations")
    expected = (404,) if user_id in (".", "..") else (200, 422)
    assert response.status_code in expected, (user_id, response.text)
    if response.status_code == 200:
        assert response.json()["user_id"] == user_id


# --- hostile bodies: fast refusals, flat memory ------------------------------------------------

HOSTILE = {
    "oversized (1 MiB, Content-Length)": (b'{"user_id": "1", "history": ["' + b"x" * (1 << 20) + b'"]}', 413),
    "history of 7000 ids (under the size limit)": (
        json.dumps({"user_id": "1", "history": [str(i % 1682 + 1) for i in range(7000)]}).encode(),
        422,
    ),
    "JSON nested 20000 levels": (b'{"user_id": "1", "history": ' + b"[" * 20000 + b"]" * 20000 + b"}", 422),
    "JSON nested 30000 levels, unterminated": (b"[" * 30000, 422),
    "k = 10**200": (b'{"user_id": "1", "k": 1' + b"0" * 200 + b"}", 422),
    "k = 1e400": (b'{"user_id": "1", "k": 1e400}', 422),
    "60 KB user id": (json.dumps({"user_id": "u" * 60_000}).encode(), 422),
}


def test_hostile_bodies_are_refused_fast_without_memory_growth(fuzz_server):
    assert len(HOSTILE["history of 7000 ids (under the size limit)"][0]) < 64 * 1024
    process = psutil.Process(fuzz_server.process.pid)
    for name, (body, status) in HOSTILE.items():  # each once, warming whatever code path it takes
        response = fuzz_server.client.post(
            "/v1/recommend", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == status, (name, response.text[:200])
    before = process.memory_info().rss

    async def burst(rounds: int = 30) -> list[tuple[str, int, float]]:
        results = []
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=30, limits=limits) as client:

            async def one(name, body):
                t0 = time.perf_counter()
                response = await client.post(
                    "/v1/recommend", content=body, headers={"content-type": "application/json"}
                )
                results.append((name, response.status_code, time.perf_counter() - t0))

            for _ in range(rounds):
                await asyncio.gather(*(one(name, body) for name, (body, _) in HOSTILE.items()))
        return results

    started = time.perf_counter()
    results = asyncio.run(burst())
    elapsed = time.perf_counter() - started
    after = process.memory_info().rss
    assert all(status == HOSTILE[name][1] for name, status, _ in results)
    slowest = max(seconds for _, _, seconds in results)
    assert slowest < 2.0, f"slowest refusal took {slowest:.2f} s"
    growth_mib = (after - before) / 2**20
    print(
        f"{len(results)} hostile requests in {elapsed:.1f} s, slowest {slowest * 1000:.0f} ms, "
        f"server RSS {before / 2**20:.1f} -> {after / 2**20:.1f} MiB ({growth_mib:+.1f} MiB)"
    )
    assert growth_mib < 20, f"server RSS grew {growth_mib:.1f} MiB over {len(results)} refused requests"
    assert fuzz_server.client.post("/v1/recommend", json={"user_id": "196"}).status_code == 200
