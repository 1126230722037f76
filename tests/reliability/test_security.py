"""What the server trusts (SECURITY.md): the admin token, the artifacts root, loopback, no CORS.

The token is compared in constant time and never logged (not even a wrong one that contains
it); reload paths must resolve inside the artifacts root (`..`, absolute paths, symlinks out,
NUL bytes refused); cross-origin browsers get no CORS grant; the default bind is 127.0.0.1.
"""

from __future__ import annotations

import logging
import os

import pytest
import slimrec.serving.deps
from fastapi.testclient import TestClient
from serving_fixtures import ADMIN_TOKEN, copy_artifact, running_server
from slimrec.serving.app import create_app
from slimrec.serving.cli import settings_from_args
from slimrec.serving.settings import Settings

from slimrec.cli import build_parser

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def layout(tiny_teacher, tmp_path_factory):
    """root/ (the artifacts root) holding v1; outside/ beside it holding a valid artifact too."""
    base = tmp_path_factory.mktemp("security")
    root = base / "root"
    copy_artifact(tiny_teacher, root / "v1")
    copy_artifact(tiny_teacher, base / "outside" / "v9")
    (root / "link-out").symlink_to(base / "outside" / "v9", target_is_directory=True)
    (root / "nested").mkdir()
    (root / "nested" / "up").symlink_to(base / "outside", target_is_directory=True)
    (root / "a-file").write_text("not a directory")
    return root, base


@pytest.fixture(scope="module")
def admin_app(layout):
    root, _ = layout
    app = create_app(
        Settings(variants={"full": root / "v1"}, admin_token=ADMIN_TOKEN, artifacts_roots=[root])
    )
    with TestClient(app) as client:
        app.state.client = client
        yield app


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../outside/v9", 403, "outside the artifacts roots"),
        ("v1/../../outside/v9", 403, "outside the artifacts roots"),
        ("ABSOLUTE_OUTSIDE", 403, "outside the artifacts roots"),
        ("/etc", 403, "outside the artifacts roots"),
        ("link-out", 403, "outside the artifacts roots"),  # a symlink in the root pointing out
        ("nested/up/v9", 403, "outside the artifacts roots"),  # a symlinked parent pointing out
        ("v1\x00/../../outside", 400, "invalid path"),
        ("a-file", 400, "not a directory"),
        ("~/v1", 400, "not a directory"),  # no home expansion: a literal "~" under the root
        ("0" * 4096, 400, "File name too long"),  # found by schemathesis: was a 500
        (".", 422, "manifest.json: missing"),  # the root itself is not an artifact
    ],
)
def test_reload_paths_must_stay_inside_the_artifacts_root(admin_app, layout, path, status, message):
    _, base = layout
    path = str(base / "outside" / "v9") if path == "ABSOLUTE_OUTSIDE" else path
    before = admin_app.state.service.variants["full"].variant.version
    response = admin_app.state.client.post("/admin/variants/full/reload", json={"path": path}, headers=AUTH)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert admin_app.state.service.variants["full"].variant.version == before


def test_the_token_is_compared_in_constant_time(admin_app, monkeypatch):
    calls = []
    real = slimrec.serving.deps.secrets.compare_digest

    def spy(a, b):
        calls.append((type(a), type(b)))
        return real(a, b)

    monkeypatch.setattr(slimrec.serving.deps.secrets, "compare_digest", spy)
    client = admin_app.state.client
    assert client.put("/admin/split", json={"weights": {"full": 1}}, headers=AUTH).status_code == 200
    wrong = client.put("/admin/split", json={"weights": {"full": 1}}, headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert calls == [(bytes, bytes), (bytes, bytes)]  # every check goes through compare_digest


def test_admin_is_disabled_without_a_token(layout):
    root, _ = layout
    with TestClient(create_app(Settings(variants={"full": root / "v1"}))) as client:
        response = client.post("/admin/variants/full/reload", json={"path": "v1"}, headers=AUTH)
        assert response.status_code == 403 and "no admin token configured" in response.json()["detail"]


def test_the_token_never_appears_in_logs_or_responses(layout, tmp_path, caplog):
    root, _ = layout
    typo = ADMIN_TOKEN + "-typo"  # a wrong token containing the real one must not be logged either
    with running_server(
        tmp_path,
        {"full": root / "v1"},
        "--log-level",
        "debug",
        "--access-log",
        "--artifacts-root",
        str(root),
        env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN},
    ) as server:
        client = server.client
        reload = "/admin/variants/full/reload"
        assert client.post(reload, json={"path": "v1"}, headers=AUTH).status_code == 200
        for headers in (
            {"Authorization": f"Bearer {typo}"},
            {"Authorization": ADMIN_TOKEN},
            {"Authorization": f"Basic {ADMIN_TOKEN}"},
        ):
            assert client.post(reload, json={"path": "v1"}, headers=headers).status_code == 401
        assert client.post(reload, json={"path": "../x"}, headers=AUTH).status_code == 403
        assert client.post(reload, json={"path": "."}, headers=AUTH).status_code == 422
        assert client.put("/admin/split", json={"weights": {"x": 1}}, headers=AUTH).status_code == 422
        exposed = [client.get(path).text for path in ("/metrics", "/v1/variants", "/openapi.json", "/readyz")]
    log = server.log_path.read_text(errors="replace")
    assert "POST /admin/variants/full/reload" in log, "debug/access logging was not captured"
    assert ADMIN_TOKEN not in log
    assert not any(ADMIN_TOKEN in text for text in exposed)
    # In-process too, with every logger at DEBUG.
    caplog.set_level(logging.DEBUG)
    settings = Settings(variants={"full": root / "v1"}, admin_token=ADMIN_TOKEN, artifacts_roots=[root])
    with TestClient(create_app(settings)) as client:
        client.post("/admin/variants/full/reload", json={"path": "v1"}, headers=AUTH)
        client.post(
            "/admin/variants/full/reload", json={"path": "v1"}, headers={"Authorization": f"Bearer {typo}"}
        )
    assert ADMIN_TOKEN not in caplog.text
    assert ADMIN_TOKEN not in repr(settings) and ADMIN_TOKEN not in str(settings.model_dump())


def test_trace_logging_is_refused(layout):
    # uvicorn's trace level logs whole request scopes, Authorization headers included.
    root, _ = layout
    with pytest.raises(ValueError, match="log_level"):
        Settings(variants={"full": root / "v1"}, log_level="trace")


def test_no_cors_grant_for_other_origins(admin_app):
    client = admin_app.state.client
    origin = {"Origin": "https://evil.example"}
    preflight_post = {
        **origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    preflight_put = {**preflight_post, "Access-Control-Request-Method": "PUT"}
    for response in (
        client.post("/v1/recommend", json={"user_id": "196"}, headers=origin),
        client.get("/v1/users/196/recommendations", headers=origin),
        client.get("/v1/variants", headers=origin),
        client.options("/v1/recommend", headers=preflight_post),
        client.options("/admin/split", headers=preflight_put),
    ):
        granted = [name for name in response.headers if name.lower().startswith("access-control-")]
        assert not granted, response.headers
    preflight = client.options("/v1/recommend", headers={**origin, "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 405


def test_loopback_by_default(layout, monkeypatch):
    root, _ = layout
    for key in [k for k in os.environ if k.startswith("SLIMREC_") and k != "SLIMREC_DATA_DIR"]:
        monkeypatch.delenv(key)
    assert Settings(variants={"full": root / "v1"}).host == "127.0.0.1"
    args = build_parser().parse_args(["serve", "--variant", f"full={root / 'v1'}"])
    settings = settings_from_args(args)
    assert settings.host == "127.0.0.1" and settings.overrides_allowed
    assert not Settings(variants={"full": root / "v1"}, host="0.0.0.0").overrides_allowed
