"""An artifact written before the package move still loads and answers as it did then.

tests/golden/README.md says how the artifact and its answers were recorded (by b7ec53b, over
HTTP). Today's server must return the same items in the same order, and the same scores up
to float32 rounding; model_version may differ (it now hashes the served files only).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from serving_fixtures import running_server

GOLDEN = Path(__file__).parents[1] / "golden"
ARTIFACT = GOLDEN / "ml100k-tiny-compressed"
ANSWERS = json.loads((GOLDEN / "ml100k-tiny-compressed.answers.json").read_text())


@pytest.fixture(scope="module")
def golden_server(tmp_path_factory):
    work = tmp_path_factory.mktemp("golden")
    artifact = shutil.copytree(ARTIFACT, work / "compressed")
    with running_server(work, {"compressed": artifact}, "--split", "compressed=100") as server:
        yield server


def test_the_golden_artifact_verifies_and_loads():
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel

    artifact = load_artifact(ARTIFACT)
    model = ServedModel(artifact)
    assert artifact.variant == "compressed" and model.n_items == 1682


def test_the_recorded_requests_cover_known_new_and_filtered_users():
    requests = [a["request"] for a in ANSWERS]
    assert any("history" in r for r in requests)
    assert any("exclude_genres" in r or "include_genres" in r for r in requests)
    assert all(a["fallback"] is None and a["items"] for a in ANSWERS)


@pytest.mark.parametrize("recorded", ANSWERS, ids=lambda a: f"{a['request']['user_id']}-k{a['request']['k']}")
def test_golden_answers_are_unchanged(golden_server, recorded):
    response = golden_server.client.post("/v1/recommend", json=recorded["request"])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fallback"] == recorded["fallback"]
    assert [item["item_id"] for item in body["items"]] == recorded["items"]
    assert [item["score"] for item in body["items"]] == pytest.approx(recorded["scores"], rel=1e-6, abs=1e-6)
