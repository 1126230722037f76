"""In-process checks: settings sources and validation, CLI errors, readiness, shadow agreement maths."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from serving_fixtures import copy_artifact
from slimrec.artifact import ArtifactError
from slimrec.serving.app import create_app
from slimrec.serving.cli import uvicorn_options
from slimrec.serving.settings import Settings
from slimrec.serving.shadow import overlap_at_k, rank_biased_overlap

from slimrec.cli import main


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("SLIMREC_") and k != "SLIMREC_DATA_DIR"]:
        monkeypatch.delenv(key)
    return monkeypatch


# --- settings ----------------------------------------------------------------------------------------


def test_settings_from_env_toml_and_kwargs(tmp_path, clean_env):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    config = tmp_path / "serve.toml"
    config.write_text(
        f'variants = {{full = "{tmp_path / "a"}", compressed = "{tmp_path / "b"}"}}\n'
        'split = {full = 3, compressed = 1}\nport = 9001\nsalt = "from-file"\n'
    )
    clean_env.setenv("SLIMREC_CONFIG_FILE", str(config))
    clean_env.setenv("SLIMREC_PORT", "9002")  # env beats the file
    settings = Settings(salt="from-kwargs")  # kwargs (the CLI) beat everything
    assert settings.split == {"full": 3.0, "compressed": 1.0}
    assert (settings.port, settings.salt) == (9002, "from-kwargs")
    clean_env.setenv("SLIMREC_SPLIT", "full=1,compressed=0")
    assert Settings().split == {"full": 1.0, "compressed": 0.0}


def test_settings_round_trip_through_env_for_workers(tmp_path, clean_env):
    settings = Settings(
        variants=f"full={tmp_path}",
        split="full=2",
        admin_token="x" * 20,
        artifacts_roots=[tmp_path],
        allow_variant_override=False,
    )
    for key, value in settings.to_env().items():
        clean_env.setenv(key, value)
    rebuilt = Settings()
    assert rebuilt.model_dump() == settings.model_dump()
    assert rebuilt.admin_token.get_secret_value() == "x" * 20


def test_batches_wait_to_fill_in_one_process_only_unless_set(tmp_path, clean_env):
    # One process: waiting makes bigger batches, less CPU per request. Each of several workers
    # sees a share of the requests, and waiting idles its core.
    assert Settings(variants=f"full={tmp_path}").batch_wait_s == 0.002
    assert Settings(variants=f"full={tmp_path}", workers=2).batch_wait_s == 0.0
    assert Settings(variants=f"full={tmp_path}", workers=2, batch_max_wait_ms=3).batch_wait_s == 0.003
    assert Settings(variants=f"full={tmp_path}", batch_max_wait_ms=0).batch_wait_s == 0.0
    clean_env.setenv("SLIMREC_WORKERS", "2")  # as a worker process rebuilds its settings
    assert Settings(variants=f"full={tmp_path}").batch_wait_s == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"split": "full=abc"}, "weight of 'full' must be a number"),
        ({"split": "full=0"}, "sum to more than 0"),
        ({"split": "full=1,int4=1"}, "unknown variant(s) 'int4'"),
        ({"split": "full=-1,compressed=2"}, "finite number >= 0"),
        ({"variants": "full=/no/such/dir"}, "does not exist"),
        ({"variants": {}}, "no variants"),
        ({"admin_token": "short"}, "at least 16 characters"),
    ],
)
def test_bad_settings_raise_value_errors(tmp_path, clean_env, kwargs, message):
    kwargs = {"variants": f"full={tmp_path},compressed={tmp_path}", **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Settings(**kwargs)


def test_overrides_default_to_loopback_only(tmp_path, clean_env):
    assert Settings(variants=f"full={tmp_path}").overrides_allowed
    assert Settings(variants=f"full={tmp_path}", host="::1").overrides_allowed
    assert not Settings(variants=f"full={tmp_path}", host="0.0.0.0").overrides_allowed
    forced_on = Settings(variants=f"full={tmp_path}", host="0.0.0.0", allow_variant_override=True)
    assert forced_on.overrides_allowed
    assert Settings(variants=f"full={tmp_path}").reload_roots == [tmp_path.parent.resolve()]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variant", "full=ART", "--split", "full=abc"], "weight of 'full' must be a number, got 'abc'"),
        (["--variant", "full=ART", "--split", "full=0"], "weights must sum to more than 0"),
        (["--variant", "full=ART", "--split", "full=1,int4=1"], "unknown variant(s) 'int4'"),
        (["--variant", "full=/no/such/artifact"], "artifact directory /no/such/artifact does not exist"),
        (["--variant", "full"], "expected NAME=VALUE"),
        (["--variant", "full=ART", "--variant", "full=ART"], "'full' given twice"),
        ([], "no variants"),
    ],
)
def test_cli_errors_exit_2_with_one_clear_line(tmp_path, clean_env, capsys, args, message):
    args = [a.replace("ART", str(tmp_path)) for a in args]
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimrec serve: error: ") and message in err and err.count("\n") == 1


# --- app lifecycle -----------------------------------------------------------------------------------


def test_readiness_follows_the_lifespan(tiny_teacher, clean_env):
    app = create_app(Settings(variants={"full": tiny_teacher}))
    client = TestClient(app)  # no `with`: the lifespan has not run, nothing is loaded
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 503
    assert client.post("/v1/recommend", json={"user_id": "1"}).status_code == 503
    with TestClient(app) as running:
        assert running.get("/readyz").json()["status"] == "ready"
        assert running.post("/v1/recommend", json={"user_id": "1"}).json()["variant"] == "full"
    assert not app.state.service.ready  # shutdown drained and marked it not ready


def test_a_tampered_artifact_fails_startup_naming_the_file(tiny_teacher, tmp_path, clean_env):
    bad = copy_artifact(tiny_teacher, tmp_path / "bad")
    target = bad / "items.faiss"
    data = bytearray(target.read_bytes())
    data[-1] ^= 1
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="items.faiss.*checksum mismatch"):
        with TestClient(create_app(Settings(variants={"full": bad}))):
            pass


# --- shadow agreement ----------------------------------------------------------------------------------


def test_overlap_at_k():
    assert overlap_at_k(["a", "b", "c"], ["a", "b", "c"], 3) == 1.0
    assert overlap_at_k(["a", "b", "c"], ["c", "x", "y"], 3) == pytest.approx(1 / 3)
    assert overlap_at_k(["a", "b"], ["x", "y"], 2) == 0.0
    assert overlap_at_k(["a"], ["a"], 10) == 0.1  # fewer than k items counts against the list


def test_rank_biased_overlap_by_hand():
    assert rank_biased_overlap(list("abcde"), list("abcde")) == pytest.approx(1.0)
    assert rank_biased_overlap(list("abc"), list("xyz")) == 0.0
    # [a, b, c] vs [c, b, a], p = 0.9: X_1 = 0, X_2 = 1, X_3 = 3
    # RBO_ext = 3/3 * 0.9^3 + (0.1/0.9) * (0 + 1/2 * 0.81 + 3/3 * 0.729) = 0.729 + 0.126 = 0.855
    assert rank_biased_overlap(list("abc"), list("cba")) == pytest.approx(0.855)
    # Disagreement at the top costs more than the same disagreement at the bottom.
    top = rank_biased_overlap(list("abcdefghij"), list("bacdefghij"))
    bottom = rank_biased_overlap(list("abcdefghij"), list("abcdefghji"))
    assert top < bottom < 1.0


# --- process settings for serving --------------------------------------------------------------------


def test_startup_freezes_what_it_loaded_and_sets_the_gil_switch_interval(tiny_teacher, clean_env):
    import gc
    import sys

    before = sys.getswitchinterval()
    app = create_app(Settings(variants={"full": tiny_teacher}, gil_switch_interval_ms=0.25))
    try:
        with TestClient(app) as client:
            assert client.get("/readyz").status_code == 200
            assert sys.getswitchinterval() == pytest.approx(0.00025)
            variant = app.state.service.variants["full"].variant
            assert gc.is_tracked(variant) and gc.get_freeze_count() > 0
            # Frozen: no generation holds it, so no collection walks it.
            assert not any(obj is variant for obj in gc.get_objects())
    finally:
        gc.unfreeze()
        sys.setswitchinterval(before)


def test_model_threads_set_their_own_faiss_thread_count(tiny_teacher, clean_env):
    """OpenMP's thread count is per thread: set on the event loop's thread it does not reach the
    model threads, which is why each one sets it itself."""
    import os
    import threading

    import faiss
    from slimrec.serving.metrics import Metrics
    from slimrec.serving.service import Service

    def on_new_thread(work):
        out = []
        thread = threading.Thread(target=lambda: out.append(work()))
        thread.start()
        thread.join()
        return out[0]

    service = Service(Settings(variants={"full": tiny_teacher}, index_threads=1), Metrics())
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        untouched = on_new_thread(faiss.omp_get_max_threads)
        set_up = on_new_thread(lambda: (service.init_model_thread(), faiss.omp_get_max_threads())[1])
    finally:
        faiss.omp_set_num_threads(before)
    assert set_up == 1
    if (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:
        assert untouched > 1


def test_refreezing_after_a_reload_frees_cycles_of_the_replaced_variant():
    import gc
    import weakref

    from slimrec.serving.service import freeze_loaded_objects

    class Node:
        pass

    old = Node()
    old.self = old  # a reference cycle: only the collector frees it
    alive = weakref.ref(old)
    try:
        freeze_loaded_objects()
        del old
        gc.collect()
        assert alive() is not None  # frozen objects are never collected...
        freeze_loaded_objects(refreeze=True)
        assert alive() is None  # ...until a reload thaws, collects and freezes again
    finally:
        gc.unfreeze()


def test_non_finite_scores_are_written_as_null(tiny_teacher, clean_env):
    import numpy as np
    import orjson
    from slimrec.serving.api import to_response
    from slimrec.serving.queries import Answer

    with TestClient(create_app(Settings(variants={"full": tiny_teacher}))) as client:
        assert client.get("/readyz").status_code == 200
        variant = client.app.state.service.variants["full"].variant
        answer = Answer(np.array([0, 1, 2]), np.array([0.5, np.nan, -np.inf], np.float32), None, {}, 1)
        body = orjson.loads(orjson.dumps(to_response(variant, "u", answer, [], "r")))  # as served
    assert [item["score"] for item in body["items"]] == [0.5, None, None]
    assert [item["item_id"] for item in body["items"]] == variant.item_ids[:3]


# --- the recommendation routes parse their own requests (serving/direct.py), as FastAPI would ----


@pytest.fixture(scope="module")
def direct_client(tiny_teacher):
    with TestClient(create_app(Settings(variants={"full": tiny_teacher}))) as client:
        yield client


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("method", "url", "kwargs", "status", "message"),
    [
        ("post", "/v1/recommend", {"content": b"", "headers": JSON}, 422, "Field required"),
        ("post", "/v1/recommend", {"content": b'{"user_id": "1"}'}, 200, None),  # no content type: JSON
        (
            "post",
            "/v1/recommend",
            {
                "content": b'{"user_id": "1"}',
                "headers": {"content-type": "application/vnd.slimrec+json; charset=utf-8"},
            },
            200,
            None,
        ),
        (
            "post",
            "/v1/recommend",
            {"content": b'{"user_id": "1"}', "headers": {"content-type": "text/plain"}},
            422,
            "must be a JSON object",
        ),
        (
            "post",
            "/v1/recommend",
            {"content": b'\xff{"user_id"', "headers": JSON},
            400,
            "malformed JSON body",
        ),
        ("post", "/v1/recommend", {"content": b'["1"]', "headers": JSON}, 422, "Input should be"),
        (
            "post",
            "/v1/recommend",
            {"content": b'{"user_id": "1", "k": "5"}', "headers": JSON},
            422,
            "k: Input should be a valid integer",
        ),  # strict: no coercion in JSON bodies
        ("get", "/v1/users/1/recommendations?k=abc", {}, 422, "k: Input should be a valid integer"),
        ("get", "/v1/users/1/recommendations?k=5&exclude_seen=false&utm_source=x", {}, 200, None),
        (
            "get",
            "/v1/users/" + "u" * 129 + "/recommendations",
            {},
            422,
            "user_id: String should have at most 128",
        ),
        (
            "get",
            "/v1/users/1/recommendations?include_genres=",
            {},
            422,
            "include_genres.0: String should have at least",
        ),
    ],
)
def test_recommendation_requests_are_parsed_as_fastapi_would(
    direct_client, method, url, kwargs, status, message
):
    response = getattr(direct_client, method)(url, **kwargs)
    assert response.status_code == status, response.text
    if message is not None:
        assert message in response.json()["detail"]
    else:
        assert response.json()["variant"] == "full" and response.headers["content-type"] == "application/json"


def test_k_and_exclude_seen_from_the_query_string_take_effect(direct_client):
    seen = direct_client.get("/v1/users/1/recommendations?k=7&exclude_seen=false").json()["items"]
    unseen = direct_client.get("/v1/users/1/recommendations?k=7").json()["items"]
    assert len(seen) == len(unseen) == 7
    body = direct_client.post("/v1/recommend", json={"user_id": "1", "k": 7, "exclude_seen": False}).json()
    assert [i["item_id"] for i in body["items"]] == [i["item_id"] for i in seen]


def test_routes_answer_alike_through_the_direct_dispatch_and_through_fastapi(tiny_teacher, clean_env):
    from slimrec.serving.direct import DirectDispatch

    def answers(app) -> list:
        with TestClient(app) as client:
            got = [
                client.get("/v1/users/1/recommendations?k=3"),
                client.get("/v1/users/1/recommendations?k=0"),
                client.post("/v1/recommend", json={"user_id": "2", "k": 4, "history": ["1", "nope"]}),
                client.post("/v1/recommend", content=b"{", headers=JSON),
            ]
        return [(r.status_code, {k: v for k, v in r.json().items() if k != "request_id"}) for r in got]

    direct = create_app(Settings(variants={"full": tiny_teacher}))
    routed = create_app(Settings(variants={"full": tiny_teacher}))
    routed.user_middleware = [m for m in routed.user_middleware if m.cls is not DirectDispatch]
    assert len(routed.user_middleware) == len(direct.user_middleware) - 1
    assert answers(direct) == answers(routed)


@pytest.mark.parametrize(
    ("kwargs", "access_log"),
    [
        ({}, False),  # off by default: the exposure log and /metrics record every recommendation
        ({"access_log": True}, True),
        ({"access_log": True, "log_level": "warning"}, False),  # uvicorn would format lines it drops
        ({"access_log": True, "log_format": "json"}, False),  # JSON writes its own request line
    ],
)
def test_uvicorns_access_line_only_when_asked(tiny_teacher, clean_env, kwargs, access_log):
    options = uvicorn_options(Settings(variants={"full": tiny_teacher}, **kwargs))
    assert options["access_log"] is access_log
    # On a real server: tests/reliability/test_security.py reads the lines `--access-log` writes.
