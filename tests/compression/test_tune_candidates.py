"""compression/tune_candidates.py: the ranker's candidate budget, chosen on validation (served path)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from slimrec.compression.gate import GateConfig
from slimrec.compression.tune_candidates import at_budget, choose_budget

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "ml100k-tiny-compressed"


def rows(*pairs):
    return [{"n_candidates": n, "ndcg@10": v} for n, v in pairs]


def test_the_smallest_budget_within_the_tolerance_of_the_largest_is_chosen():
    # 200 scores 0.2000; tolerance 0.005 sets the floor at 0.1990: 100 (0.1992) passes, 50 (0.1989) does not.
    figures = rows((200, 0.2000), (150, 0.2003), (100, 0.1992), (50, 0.1989))
    assert choose_budget([figures], 0.005) == 100
    assert choose_budget([figures], 0.0) == 150  # only budgets at least as good as 200
    assert choose_budget([figures], 0.01) == 50
    assert choose_budget([rows((200, 0.2), (100, 0.1))], 0.005) == 200  # the reference always passes
    # Row order does not matter: budgets are walked from the largest down.
    assert choose_budget([list(reversed(figures))], 0.005) == 100
    # Known and new users: a budget must pass both (new users: floor 0.1500 x 0.995 = 0.14925).
    new_users = rows((200, 0.1500), (150, 0.1495), (100, 0.1493), (50, 0.1400))
    assert choose_budget([figures, new_users], 0.005) == 100


def test_no_budget_is_chosen_past_a_larger_one_that_failed():
    # Floor 0.1990: 100 (0.1985) fails, so 50 (0.1995) is not chosen although it passes alone
    # (the old rule, the smallest passing budget, chose 50 here).
    figures = rows((200, 0.2000), (150, 0.1998), (100, 0.1985), (50, 0.1995))
    assert choose_budget([figures], 0.005) == 150
    assert choose_budget([rows((200, 0.2), (150, 0.18), (100, 0.2), (50, 0.2))], 0.005) == 200
    # A failure in either set stops the walk: 100 fails for new users only (floor 0.14925).
    new_users = rows((200, 0.1500), (150, 0.1500), (100, 0.1480), (50, 0.1500))
    passing = rows((200, 0.2000), (150, 0.2000), (100, 0.2000), (50, 0.2000))
    assert choose_budget([passing], 0.005) == 50
    assert choose_budget([passing, new_users], 0.005) == 150
    # 150 fails for new users (0.1490), 100 passes both: the old rule chose 100, the walk stops at 200.
    known = rows((200, 0.2000), (150, 0.2003), (100, 0.1992), (50, 0.1989))
    new_users = rows((200, 0.1500), (150, 0.1490), (100, 0.1495), (50, 0.1400))
    assert choose_budget([known, new_users], 0.005) == 200
    with pytest.raises(ValueError, match="different budgets"):
        choose_budget([passing, new_users[:2]], 0.005)


def test_gate_config_checks_the_budgets_and_their_tolerance():
    assert GateConfig(candidate_budgets=(50, 200, 100, 200)).candidate_budgets == (200, 100, 50)
    with pytest.raises(ValueError, match="candidate_tolerance"):
        GateConfig(candidate_tolerance=1.0)
    with pytest.raises(ValueError, match="candidate_budgets"):
        GateConfig(candidate_budgets=(200, 5))


def test_at_budget_replaces_only_the_top_10_metrics_of_that_fold():
    metrics = {"ndcg@10": 0.2, "recall@10": 0.1, "hr@10": 0.5, "mrr@10": 0.3, "recall@200": 0.7}
    chosen = {"n_candidates": 100, "ndcg@10": 0.19, "recall@10": 0.09, "hr@10": 0.49, "mrr@10": 0.29}
    serving = {"n_candidates": 100, "candidate_budget": {"valid": [chosen], "test": []}}
    served = at_budget(metrics, serving, "valid")
    assert served["ndcg@10"] == 0.19 and served["mrr@10"] == 0.29 and served["recall@200"] == 0.7
    assert at_budget(metrics, serving, "test") == metrics  # no test row for 100: unchanged
    assert at_budget(metrics, None, "valid") == metrics  # an artifact from before budgets


@pytest.mark.parametrize("as_new_users", [False, True], ids=["known", "new-users"])
def test_each_budget_scores_what_the_server_would_answer(ml100k, as_new_users):
    """Retrieving once and ranking prefixes gives the lists `recommend(batch, 10, n)` gives."""
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel
    from slimrec.compression.tune_candidates import budget_lists
    from slimrec.models.served_eval import anonymous
    from slimrec.models.split import VALID, protocol_split

    model = ServedModel(load_artifact(GOLDEN), "selection/")
    split = protocol_split(ml100k)
    users = np.unique(split.user[split.fold == VALID])[:300]  # two batches of the evaluation
    lists = budget_lists(model, users, (200, 100, 50), as_new_users)

    def batch(s):
        known = model.known_users(users[s : s + 256])
        return anonymous(model, known) if as_new_users else known

    for n in (200, 100, 50):
        served = np.concatenate([model.recommend(batch(s), 10, n).items for s in range(0, 300, 256)])
        np.testing.assert_array_equal(lists[n], served)
    assert (lists[50] != lists[200]).any()  # the budgets really differ, else this proves nothing


def test_tuning_records_the_budget_the_server_then_uses(ml100k, tmp_path):
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel, candidate_budget
    from slimrec.compression.tune_candidates import tune_candidate_budget
    from slimrec.models.served_eval import evaluate_model
    from slimrec.models.split import VALID

    artifact = shutil.copytree(GOLDEN, tmp_path / "compressed")
    assert candidate_budget(load_artifact(artifact)) == 200  # no budget recorded: the default
    config = GateConfig(candidate_budgets=(200, 100, 50), candidate_tolerance=0.005)
    record = tune_candidate_budget(artifact, ml100k, config)
    reloaded = load_artifact(artifact)  # every checksum still verifies
    assert reloaded.manifest["serving"] == record
    chosen = record["n_candidates"]
    assert candidate_budget(reloaded) == chosen == ServedModel(reloaded).n_candidates
    tuned = record["candidate_budget"]
    valid = {r["n_candidates"]: r for r in tuned["valid"]}
    new_users = {r["n_candidates"]: r for r in tuned["valid_history_only"]}
    assert sorted(valid) == sorted(new_users) == [50, 100, 200]

    def passes(figures, n):
        return figures[n]["ndcg@10"] >= figures[200]["ndcg@10"] * (1 - 0.005)

    def passes_both(n):
        return passes(valid, n) and passes(new_users, n)

    assert all(passes_both(n) for n in valid if n >= chosen)  # chosen and every larger budget
    smaller = [n for n in valid if n < chosen]
    assert not smaller or not passes_both(max(smaller))  # the walk stopped at a failure
    # The 200-candidate figure is the one `slimrec evaluate` reports for the selection models.
    full = evaluate_model(ServedModel(reloaded, "selection/"), ml100k, VALID)
    assert valid[200]["ndcg@10"] == pytest.approx(full["two_stage"]["ndcg@10"], abs=1e-12)
    for fold in ("test", "test_history_only"):
        assert [r["n_candidates"] for r in tuned[fold]] == sorted({200, chosen}, reverse=True)


def test_tuning_that_keeps_the_largest_budget_scores_test_once(ml100k, tmp_path):
    # The chosen budget is also the reference: test is scored at it once (make demo crashed when
    # (200, 200) was scored as two budgets, every user twice against one set of relevant items).
    from slimrec.compression.tune_candidates import tune_candidate_budget

    artifact = shutil.copytree(GOLDEN, tmp_path / "compressed")
    record = tune_candidate_budget(artifact, ml100k, GateConfig(candidate_budgets=(200,)))
    assert record["n_candidates"] == 200
    for fold in ("valid", "test", "valid_history_only", "test_history_only"):
        rows = record["candidate_budget"][fold]
        assert [r["n_candidates"] for r in rows] == [200]
        assert rows[0]["ndcg@10_change"] == 0.0 and 0 < rows[0]["ndcg@10"] < 1


def test_the_report_says_which_budget_was_chosen_and_its_cost_on_test():
    from slimrec.compression.report_render import render_candidates

    row = {
        "ndcg@10_change": -0.001,
        "ndcg@10_change_se": 0.0005,
        "recall@10": 0.1,
        "hr@10": 0.5,
        "mrr@10": 0.3,
    }
    serving = {
        "n_candidates": 100,
        "candidate_budget": {
            "reference": 200,
            "tolerance": 0.005,
            "seconds": 1.5,
            "valid": [
                {"n_candidates": 200, "ndcg@10": 0.2, **row},
                {"n_candidates": 100, "ndcg@10": 0.199, **row},
            ],
            "test": [
                {"n_candidates": 200, "ndcg@10": 0.21, **row},
                {"n_candidates": 100, "ndcg@10": 0.208, **row},
            ],
        },
    }
    text = "\n".join(render_candidates(serving))
    assert "N = **100**" in text and "| test | 100 (chosen) | 0.2080 | -0.0010 (0.0005)" in text
    assert render_candidates({}) == []
