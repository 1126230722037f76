"""models/ranking_metrics.py: Recall, HR, NDCG, MRR at k, by hand and against a reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from slimrec.models.csr import csr_from_pairs
from slimrec.models.ranking_metrics import (
    hit_matrix,
    per_user_ndcg_at_10,
    per_user_ranking_metrics,
    ranking_metrics,
    standard_error,
)


def csr(sets: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """CSR from a list of per-user item lists (test convenience)."""
    rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
    cols = np.array([i for s in sets for i in s], dtype=np.int64)
    return csr_from_pairs(rows, cols, len(sets))


# --------------------------------------------------------------------------- hand-computed case
#
# 4 users, 6 items (0..5), ranked lists of 6 columns:
#   user 0: top [2, 5, 1, 0, 4, 3], relevant {2, 1}    -> hits at ranks 1 and 3
#       recall@1 = 1/2, recall@3 = 2/2 = 1, HR = 1, MRR = 1/1 = 1
#       NDCG@10 = (1/log2(2) + 1/log2(4)) / (1/log2(2) + 1/log2(3)) = (1 + 1/2) / (1 + 0.63093) = 0.91972
#   user 1: top [0, 1, 3, -1, -1, -1], relevant {3, 4, 5} -> one hit at rank 3; -1 padding never hits
#       recall@1 = 0, recall@3 = 1/3, HR = 1, MRR = 1/3
#       NDCG@10 = (1/log2(4)) / (1 + 1/log2(3) + 1/log2(4)) = 0.5 / 2.13093 = 0.23464
#   user 2: relevant {}  -> skipped (not averaged over)
#   user 3: top [1, 2, 3, 4, 5, -1], relevant {0}      -> no hit: every metric 0
# Averages over users 0, 1, 3 (users = 3):
#   recall@1 = (1/2 + 0 + 0)/3 = 1/6          recall@3 = (1 + 1/3 + 0)/3 = 4/9
#   HR@10    = (1 + 1 + 0)/3 = 2/3            MRR@10   = (1 + 1/3 + 0)/3 = 4/9
#   NDCG@10  = (0.91972 + 0.23464 + 0)/3

HAND_TOP = np.array(
    [
        [2, 5, 1, 0, 4, 3],
        [0, 1, 3, -1, -1, -1],
        [0, 1, 2, 3, 4, 5],
        [1, 2, 3, 4, 5, -1],
    ]
)
HAND_RELEVANT = [[2, 1], [3, 4, 5], [], [0]]
NDCG_USER0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
NDCG_USER1 = (1 / math.log2(4)) / (1 + 1 / math.log2(3) + 1 / math.log2(4))


def test_hand_computed_metrics():
    result = ranking_metrics(HAND_TOP, *csr(HAND_RELEVANT), ks=(1, 3, 10))
    assert result["users"] == 3
    assert result["recall@1"] == pytest.approx(1 / 6)
    assert result["recall@3"] == pytest.approx(4 / 9)
    assert result["recall@10"] == pytest.approx(4 / 9)  # only 6 columns: recall@10 uses those
    assert result["hr@10"] == pytest.approx(2 / 3)
    assert result["mrr@10"] == pytest.approx(4 / 9)
    assert result["ndcg@10"] == pytest.approx((NDCG_USER0 + NDCG_USER1 + 0.0) / 3)
    assert NDCG_USER0 == pytest.approx(0.91972, abs=1e-5)
    assert NDCG_USER1 == pytest.approx(0.23464, abs=1e-5)


def test_default_keys_exactly():
    result = ranking_metrics(HAND_TOP, *csr(HAND_RELEVANT))
    assert list(result) == ["recall@10", "recall@50", "recall@200", "ndcg@10", "hr@10", "mrr@10", "users"]
    # Lists have 6 columns, so recall@50 and recall@200 equal recall@6 (documented behaviour).
    assert result["recall@200"] == result["recall@50"] == pytest.approx(4 / 9)


def test_per_user_arrays_and_skipped_users():
    per_user = per_user_ranking_metrics(HAND_TOP, *csr(HAND_RELEVANT), ks=(3,))
    np.testing.assert_array_equal(per_user["user"], [0, 1, 3])
    np.testing.assert_allclose(per_user["recall@3"], [1, 1 / 3, 0])
    np.testing.assert_allclose(per_user["mrr@10"], [1, 1 / 3, 0])
    np.testing.assert_allclose(per_user["hr@10"], [1, 1, 0])
    ndcg = per_user_ndcg_at_10(HAND_TOP, *csr(HAND_RELEVANT))
    np.testing.assert_allclose(ndcg, [NDCG_USER0, NDCG_USER1, 0.0])
    assert ndcg.mean() == pytest.approx(ranking_metrics(HAND_TOP, *csr(HAND_RELEVANT))["ndcg@10"])


def test_padding_never_hits_even_where_keys_would_collide():
    # With bound = 6, user 1's padding key 1*6 + (-1) = 5 equals user 0's key for item 5.
    top = np.array([[0, 1], [-1, -1]])
    hits = hit_matrix(top, *csr([[5], [5]]))
    assert not hits.any()
    result = ranking_metrics(top, *csr([[5], [5]]))
    assert result["users"] == 2 and result["hr@10"] == 0.0


def test_duplicate_relevant_items_count_once():
    # relevant {3, 3} is the set {3}: a hit at rank 1 is recall 1, NDCG 1.
    result = ranking_metrics(np.array([[3, 0, 1]]), *csr([[3, 3]]))
    assert result["recall@10"] == 1.0 and result["ndcg@10"] == 1.0


def test_ndcg_ideal_uses_at_most_ten_hits():
    # 12 relevant items, all of the top 10 hit: DCG == IDCG over 10 slots -> NDCG 1, recall 10/12.
    top = np.arange(20)[None, :]
    result = ranking_metrics(top, *csr([list(range(12))]), ks=(10,))
    assert result["ndcg@10"] == pytest.approx(1.0)
    assert result["recall@10"] == pytest.approx(10 / 12)


def test_no_evaluable_users_gives_nan():
    result = ranking_metrics(np.array([[0, 1]]), *csr([[]]))
    assert result["users"] == 0 and math.isnan(result["ndcg@10"])


def test_rejects_repeated_items_and_bad_padding():
    with pytest.raises(ValueError, match="repeats"):
        ranking_metrics(np.array([[1, 1, 2]]), *csr([[1]]))
    with pytest.raises(ValueError, match="-1 padding"):
        ranking_metrics(np.array([[1, -2]]), *csr([[1]]))
    with pytest.raises(ValueError, match="n_users"):
        ranking_metrics(np.array([[1, 2]]), *csr([[1], [2]]))


# --------------------------------------------------------------------------- randomized cross-check


def reference_metrics(top_lists: list[list[int]], relevant_sets: list[set[int]], ks) -> dict[str, float]:
    """Plain-Python PROTOCOL.md definitions, user by user."""
    sums: dict[str, float] = {f"recall@{k}": 0.0 for k in ks} | {"ndcg@10": 0.0, "hr@10": 0.0, "mrr@10": 0.0}
    users = 0
    for ranked, relevant in zip(top_lists, relevant_sets, strict=True):
        if not relevant:
            continue
        users += 1
        # -1 padding is never in `relevant`, so it can never count as a hit here.
        for k in ks:
            sums[f"recall@{k}"] += len(relevant & set(ranked[:k])) / len(relevant)
        hit_ranks = [rank for rank, item in enumerate(ranked[:10], start=1) if item in relevant]
        dcg = sum(1 / math.log2(rank + 1) for rank in hit_ranks)
        idcg = sum(1 / math.log2(rank + 1) for rank in range(1, min(10, len(relevant)) + 1))
        sums["ndcg@10"] += dcg / idcg
        sums["hr@10"] += 1.0 if hit_ranks else 0.0
        sums["mrr@10"] += 1 / hit_ranks[0] if hit_ranks else 0.0
    return {name: total / users for name, total in sums.items()} | {"users": users}


def test_random_cross_check_against_reference():
    rng = np.random.default_rng(20240601)
    n_users, n_items, width = 50, 400, 200
    top = np.empty((n_users, width), dtype=np.int64)
    relevant_sets: list[set[int]] = []
    for user in range(n_users):
        top[user] = rng.permutation(n_items)[:width]
        top[user, width - rng.integers(0, 30) :] = -1  # ragged -1 padding (0..29 slots)
        size = rng.integers(0, 25)  # some users get an empty set
        # Half from the head of the list so that top-10 hits are common.
        candidates = np.r_[top[user, :15][top[user, :15] >= 0], rng.integers(0, n_items, size)]
        relevant_sets.append({int(i) for i in rng.choice(candidates, size=size)} if size else set())
    assert any(not s for s in relevant_sets)

    ks = (10, 50, 200)
    got = ranking_metrics(top, *csr([sorted(s) for s in relevant_sets]), ks=ks)
    want = reference_metrics(top.tolist(), relevant_sets, ks)
    assert got["users"] == want["users"]
    for name in want:
        assert got[name] == pytest.approx(want[name], abs=1e-12), name
    assert 0 < got["hr@10"] < 1  # the data exercises both hits and misses


def test_standard_error():
    values = np.array([1.0, 2.0, 4.0, 7.0])
    assert standard_error(values) == pytest.approx(np.std(values, ddof=1) / 2.0)
    assert math.isnan(standard_error(np.array([0.5])))
