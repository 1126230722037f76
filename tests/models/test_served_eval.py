"""models/served_eval.py: the history-only figures are what a new user sending their history gets,
and per-user NDCG@10 averages to the reported two-stage figure."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.artifact import load_artifact
from slimrec.artifact.runtime import ServedModel
from slimrec.models.served_eval import per_user_ndcg, served_lists
from slimrec.models.split import TEST
from slimrec.serving.queries import Query, sent_history_batch, stored_items


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return load_artifact(tiny_teacher)


@pytest.mark.slow
def test_history_only_lists_are_the_servers_answer_to_a_new_user_sending_their_history(teacher):
    model = ServedModel(teacher)
    users = np.arange(0, 943, 15)  # 63 users across the id range
    _, history_only = served_lists(model, users, as_new_users=True)
    # What POST /v1/recommend assembles for an unknown id with the user's items as its history.
    queries = [Query(k=200, user=None, extra=stored_items(model, int(u)).astype(np.int64)) for u in users]
    answer = model.recommend(sent_history_batch(model, queries), 200, 200).items
    assert np.array_equal(answer, history_only[:, : answer.shape[1]])
    _, known = served_lists(model, users)
    assert not np.array_equal(known, history_only)  # the id and features do change the lists


@pytest.mark.slow
def test_per_user_ndcg_averages_to_the_reported_two_stage_figure(teacher, ml100k):
    model = ServedModel(teacher)
    metrics = teacher.read_json("metrics.json")
    users, ndcg = per_user_ndcg(model, ml100k, TEST)
    assert len(users) == len(ndcg) == 943
    assert float(ndcg.mean()) == pytest.approx(metrics["two_stage"]["test"]["ndcg@10"], abs=1e-9)
    _, new = per_user_ndcg(model, ml100k, TEST, as_new_users=True)
    assert float(new.mean()) == pytest.approx(metrics["history_only"]["test"]["ndcg@10"], abs=1e-9)
