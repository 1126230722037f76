"""Admin API against real servers: hot reload (good, tampered, not promotable, outside the root),
split changes, the token check, and servers where admin and variant overrides are disabled."""

from __future__ import annotations

import json
import signal

import pytest
from serving_fixtures import ADMIN_TOKEN, copy_artifact, metric_value, running_server
from slimrec.artifact import amend_artifact, sha256_file
from slimrec.serving.router import assign_variant

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def roots(tiny_teacher, tmp_path_factory):
    """artifacts/ (the reload root) with v1 served; outside/ beside it, not reloadable."""
    base = tmp_path_factory.mktemp("admin")
    artifacts = base / "artifacts"
    copy_artifact(tiny_teacher, artifacts / "v1")
    copy_artifact(tiny_teacher, base / "outside" / "v9")
    return artifacts, base


@pytest.fixture(scope="module")
def server(roots, tmp_path_factory):
    artifacts, _ = roots
    variants = {"full": artifacts / "v1", "compressed": artifacts / "v1"}
    with running_server(
        tmp_path_factory.mktemp("logs"),
        variants,
        "--salt",
        "admin-salt",
        env={"SLIMREC_ADMIN_TOKEN": ADMIN_TOKEN},
    ) as srv:
        yield srv


def version(server, variant: str) -> str:
    response = server.client.post(
        "/v1/recommend", json={"user_id": "196", "k": 3}, headers={"X-Slimrec-Variant": variant}
    )
    assert response.status_code == 200, response.text
    return response.json()["model_version"]


def reload(server, variant: str, expect: int, headers=AUTH, **body):
    response = server.client.post(f"/admin/variants/{variant}/reload", json=body, headers=headers)
    assert response.status_code == expect, response.text
    return response.json()


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token"},
        {"Authorization": ADMIN_TOKEN},  # no "Bearer" scheme
        {"Authorization": "Bearer \u2713".encode()},
    ],
)  # non-ASCII
def test_missing_or_wrong_token_is_refused(server, headers):
    body = reload(server, "full", 401, headers=headers, path="v1")
    assert "admin token" in body["detail"]
    split = server.client.put("/admin/split", json={"weights": {"full": 1}}, headers=headers)
    assert split.status_code == 401


def test_good_artifact_swaps_in(server, roots):
    artifacts, _ = roots
    old = version(server, "full")
    copy_artifact(artifacts / "v1", artifacts / "v2")
    amend_artifact(artifacts / "v2", files={"note.json": (b'{"note": "retrained"}', "served")})  # new version
    body = reload(server, "full", 200, path="v2")
    assert body["previous_version"] == old and body["model_version"] != old
    assert version(server, "full") == body["model_version"]
    assert version(server, "compressed") == old  # the other variant is untouched
    text = server.client.get("/metrics").text
    assert metric_value(text, "slimrec_reloads_total", variant="full", outcome="swapped") >= 1
    listing = {v["name"]: v for v in server.client.get("/v1/variants").json()["variants"]}
    assert listing["full"]["path"].endswith("v2")


def test_tampered_artifact_is_refused_and_the_old_one_keeps_serving(server, roots):
    artifacts, _ = roots
    before = version(server, "full")
    tampered = copy_artifact(artifacts / "v1", artifacts / "tampered")
    target = tampered / "ranker.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    target.write_bytes(bytes(data))
    body = reload(server, "full", 422, path=str(tampered))
    assert "ranker.onnx" in body["detail"] and "checksum" in body["detail"]
    assert version(server, "full") == before


def test_a_consistent_but_broken_artifact_is_refused(server, roots):
    # Checksums match (the manifest was rewritten), but the ONNX graph is garbage: loading fails.
    artifacts, _ = roots
    before = version(server, "full")
    broken = copy_artifact(artifacts / "v1", artifacts / "broken")
    (broken / "user_tower.onnx").write_bytes(b"not an onnx graph")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["files"]["user_tower.onnx"].update(sha256=sha256_file(broken / "user_tower.onnx"), bytes=17)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    assert "still serving the previous one" in reload(server, "full", 422, path="broken")["detail"]
    assert version(server, "full") == before


def test_not_promotable_needs_force(server, roots):
    artifacts, _ = roots
    blocked = copy_artifact(artifacts / "v1", artifacts / "blocked")
    manifest = json.loads((blocked / "manifest.json").read_text())
    manifest["promotable"] = False
    (blocked / "manifest.json").write_text(json.dumps(manifest))
    assert "promotable: false" in reload(server, "compressed", 409, path="blocked")["detail"]
    assert reload(server, "compressed", 200, path="blocked", force=True)["variant"] == "compressed"


@pytest.mark.parametrize(
    ("path", "status", "message"),
    [
        ("../outside/v9", 403, "outside the artifacts roots"),
        ("OUTSIDE_ABSOLUTE", 403, "outside the artifacts roots"),
        ("no-such-dir", 400, "not a directory"),
    ],
)
def test_paths_outside_the_root_or_missing_are_refused(server, roots, path, status, message):
    _, base = roots
    path = str(base / "outside" / "v9") if path == "OUTSIDE_ABSOLUTE" else path
    assert message in reload(server, "full", status, path=path)["detail"]


def test_unknown_variant_reload_is_404(server):
    assert "unknown variant" in reload(server, "int4", 404, path="v1")["detail"]


def test_split_changes_at_run_time(server):
    users = [str(u) for u in range(1, 200)]
    on_compressed = [
        u for u in users if assign_variant(u, {"full": 1, "compressed": 1}, "admin-salt") == "compressed"
    ]
    assert on_compressed
    response = server.client.put("/admin/split", json={"weights": {"full": 100}}, headers=AUTH)
    assert response.status_code == 200 and response.json()["split"] == {"full": 100.0, "compressed": 0.0}
    for user in on_compressed[:10]:
        assert server.client.post("/v1/recommend", json={"user_id": user}).json()["variant"] == "full"
    bad = server.client.put("/admin/split", json={"weights": {"full": 1, "int4": 1}}, headers=AUTH)
    assert bad.status_code == 422 and "unknown variant" in bad.json()["detail"]
    zero = server.client.put("/admin/split", json={"weights": {"full": 0}}, headers=AUTH)
    assert zero.status_code == 422 and "sum to more than 0" in zero.json()["detail"]
    server.client.put("/admin/split", json={"weights": {"full": 1, "compressed": 1}}, headers=AUTH)


def test_admin_disabled_and_overrides_refused_when_configured_off(roots, tmp_path):
    artifacts, _ = roots
    with running_server(tmp_path, {"full": artifacts / "v1"}, "--no-allow-variant-override") as srv:
        refused = srv.client.post(
            "/v1/recommend", json={"user_id": "196"}, headers={"X-Slimrec-Variant": "full"}
        )
        assert refused.status_code == 403 and "disabled" in refused.json()["detail"]
        assert srv.client.post("/v1/recommend", json={"user_id": "196"}).status_code == 200
        admin = srv.client.post("/admin/variants/full/reload", json={"path": "v1"}, headers=AUTH)
        assert admin.status_code == 403 and "SLIMREC_ADMIN_TOKEN" in admin.json()["detail"]
        assert srv.client.get("/v1/variants").json()["overrides_allowed"] is False
        # SIGTERM: uvicorn drains, runs the lifespan shutdown, then re-raises the signal.
        assert srv.stop() in (0, -signal.SIGTERM) and "Traceback" not in srv.log()
