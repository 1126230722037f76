"""A variant serves with its artifact's candidate budget unless the server's n_candidates overrides it.

The golden compressed artifact names no budget (200); a copy gets `serving.n_candidates` in its
manifest as `slimrec compress` writes it. The answers are checked against `ServedModel.recommend`
at each budget, for users whose top-10 differs between the two budgets.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from slimrec.artifact import ArtifactError, amend_artifact, load_artifact
from slimrec.artifact.runtime import ServedModel
from slimrec.serving.app import create_app
from slimrec.serving.settings import Settings

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"
BUDGET = 30


@pytest.fixture(scope="module")
def budgeted(tmp_path_factory) -> Path:
    artifact = shutil.copytree(GOLDEN, tmp_path_factory.mktemp("budget") / "compressed")
    amend_artifact(artifact, fields={"serving": {"n_candidates": BUDGET}})
    return artifact


@pytest.fixture(scope="module")
def offline(budgeted):
    """(raw user ids whose top-10 differs between BUDGET and 200, answer(user, k, n) -> item ids)."""
    model = ServedModel(load_artifact(budgeted))
    catalogue = load_artifact(budgeted).read_json("catalogue.json")
    user_ids, item_ids = [str(u) for u in catalogue["user_ids"]], [str(i) for i in catalogue["item_ids"]]

    def answer(user: str, k: int, n: int) -> list[str]:
        items = model.recommend(model.known_users(np.array([user_ids.index(user)])), k, n).items[0]
        return [item_ids[i] for i in items if i >= 0]

    differ = [u for u in user_ids[:60] if answer(u, 10, BUDGET) != answer(u, 10, 200)][:5]
    assert differ, "no user's top-10 depends on the budget: the test would prove nothing"
    return differ, answer


def served(client: TestClient, user: str, k: int) -> list[str]:
    response = client.post("/v1/recommend", json={"user_id": user, "k": k})
    assert response.status_code == 200, response.text
    assert response.json()["fallback"] is None
    return [item["item_id"] for item in response.json()["items"]]


def budget_shown(client: TestClient) -> tuple[int, str]:
    (info,) = client.get("/v1/variants").json()["variants"]
    return info["n_candidates"], info["n_candidates_from"]


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_the_artifacts_budget_is_served(budgeted, offline, model_process):
    users, answer = offline
    settings = Settings(variants={"compressed": budgeted}, model_process=model_process)
    with TestClient(create_app(settings)) as client:
        assert budget_shown(client) == (BUDGET, "artifact")
        for user in users:
            assert served(client, user, 10) == answer(user, 10, BUDGET)
        # More items than the budget: as many candidates as asked for are ranked.
        assert served(client, users[0], 50) == answer(users[0], 50, 50)
        assert len(served(client, users[0], 50)) == 50


def test_an_explicit_setting_overrides_the_artifacts_budget(budgeted, offline):
    users, answer = offline
    with TestClient(create_app(Settings(variants={"compressed": budgeted}, n_candidates=200))) as client:
        assert budget_shown(client) == (200, "settings")
        for user in users:
            assert served(client, user, 10) == answer(user, 10, 200)


def test_an_artifact_without_a_budget_serves_200(offline):
    users, answer = offline
    with TestClient(create_app(Settings(variants={"compressed": GOLDEN}))) as client:
        assert budget_shown(client) == (200, "default")
        assert served(client, users[0], 10) == answer(users[0], 10, 200)


def test_the_budget_and_its_source_come_from_the_manifest(budgeted, tmp_path):
    from slimrec.artifact.runtime import candidate_budget, candidate_budget_and_source

    assert candidate_budget_and_source(load_artifact(budgeted)) == (BUDGET, "artifact")
    assert candidate_budget_and_source(load_artifact(GOLDEN)) == (200, "default")
    assert candidate_budget(load_artifact(budgeted)) == BUDGET
    artifact = shutil.copytree(GOLDEN, tmp_path / "other")
    amend_artifact(artifact, fields={"serving": {"note": "no budget"}})
    assert candidate_budget_and_source(load_artifact(artifact)) == (200, "default")
    amend_artifact(artifact, fields={"serving": [30]})
    with pytest.raises(ArtifactError, match=r"manifest.json: serving must be an object"):
        candidate_budget_and_source(load_artifact(artifact))


def test_a_malformed_budget_is_refused_naming_the_manifest(tmp_path):
    from slimrec.serving.variants import load_variant

    artifact = shutil.copytree(GOLDEN, tmp_path / "compressed")
    amend_artifact(artifact, fields={"serving": {"n_candidates": 0}})
    with pytest.raises(ArtifactError, match=r"manifest.json: serving.n_candidates must be a positive int"):
        load_variant("compressed", artifact)


def test_a_deeper_request_in_the_batch_leaves_the_others_ranked_within_the_budget(budgeted):
    """A model call ranks max(budget, its largest k) candidates, so requests for more items than the
    budget run apart: the others' answers come from their top-budget candidates, as alone.
    (Exact equality with a lone answer is not the test: this ranker quantizes per batch.)"""
    from slimrec.serving.queries import build_query
    from slimrec.serving.service import InProcessRunner, run_by_depth
    from slimrec.serving.variants import load_variant

    variant = load_variant("compressed", budgeted, cache_known_users=True)  # as InProcessModels loads it
    model, run = variant.model, InProcessRunner(variant).run
    budget = 10  # k=10 requests then only reorder their candidates: deeper ones are easy to see

    def within_budget(user: str, items) -> bool:
        batch = model.known_users(np.array([variant.user_index[user]]))
        top = model.retrieve(model.user_vectors(batch), budget, batch)[0][0]
        return set(items.tolist()) <= set(top.tolist())

    deeper_in_one_call = 0
    for user in (str(u) for u in range(1, 41)):
        shallow, deep, other = (build_query(variant, u, k) for u, k in ((user, 10), ("5", 50), ("7", 10)))
        batched = run_by_depth(run, [shallow, deep, other], budget)
        # The same as the two calls it makes: the k <= budget requests together, the deep one apart.
        apart = run([shallow, other], budget)
        assert [a.items.tolist() for a in batched] == [
            apart[0].items.tolist(),
            run([deep], budget)[0].items.tolist(),
            apart[1].items.tolist(),
        ]
        assert within_budget(user, batched[0].items) and len(batched[1].items) == 50
        deeper_in_one_call += not within_budget(user, run([shallow, deep], budget)[0].items)
    assert deeper_in_one_call > 0  # one call for the whole batch ranks deeper: the test can fail
