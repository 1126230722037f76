"""models/top_k.py: top-k over a score matrix with per-row exclusions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from slimrec.models.csr import csr_from_pairs, csr_slice
from slimrec.models.top_k import top_k_excluding


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


# --------------------------------------------------------------------------- top_k_excluding


def reference_top_k(scores: np.ndarray, k: int, excluded: list[list[int]]) -> np.ndarray:
    """Sort by (score desc, item asc) per row, drop excluded, pad with -1."""
    out = np.full((scores.shape[0], k), -1)
    for user, row in enumerate(scores):
        ranked = [i for i in sorted(range(len(row)), key=lambda i: (-row[i], i)) if i not in excluded[user]]
        out[user, : min(k, len(ranked))] = ranked[:k]
    return out


def test_top_k_excluding_basic_and_never_returns_excluded():
    scores = np.array([[0.1, 0.9, 0.5, 0.7, 0.3], [0.5, 0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    original = scores.copy()
    excluded = [[1, 3], []]
    top = top_k_excluding(scores, 3, *csr(excluded))
    np.testing.assert_array_equal(top, [[2, 4, 0], [0, 1, 2]])
    assert top.dtype == np.int64
    np.testing.assert_array_equal(scores, original)  # input untouched


def test_top_k_excluding_ties_break_by_lower_item_index():
    # Items 1, 2, 3 tie at 3.0; k = 2 must take 1 and 2 (the boundary tie resolved by index).
    scores = np.array([[1.0, 3.0, 3.0, 3.0, 0.0], [2.0] * 5], dtype=np.float32)
    np.testing.assert_array_equal(top_k_excluding(scores, 2, *csr([[], [0]])), [[1, 2], [1, 2]])
    # -0.0 == 0.0, so they tie and the lower index wins.
    signed_zero = np.array([[0.0, -0.0, 0.0]], dtype=np.float32)
    signed_zero[0, 0] = -0.0
    np.testing.assert_array_equal(top_k_excluding(signed_zero, 3, *csr([[]])), [[0, 1, 2]])


def test_top_k_excluding_pads_when_k_exceeds_available():
    scores = np.array([[0.4, 0.1, 0.3, 0.2]], dtype=np.float32)
    top = top_k_excluding(scores, 6, *csr([[0, 2]]))
    np.testing.assert_array_equal(top, [[3, 1, -1, -1, -1, -1]])
    # Everything excluded: all padding.
    np.testing.assert_array_equal(top_k_excluding(scores, 2, *csr([[0, 1, 2, 3]])), [[-1, -1]])


def test_top_k_excluding_orders_across_signs_and_magnitudes():
    values = [-np.inf, -1e30, -1.0, -1e-40, 0.0, 1e-40, 1.0, 1e30, np.inf]  # 1e-40 is subnormal
    permutation = np.random.default_rng(1).permutation(len(values))
    scores = np.array([values], dtype=np.float32)[:, permutation]
    expected = np.argsort(-scores[0], kind="stable")  # values are distinct: no ties to break
    np.testing.assert_array_equal(top_k_excluding(scores, len(values), *csr([[]]))[0], expected)


def test_top_k_excluding_returns_minus_inf_items_that_are_not_excluded():
    scores = np.array([[-np.inf, 1.0, -np.inf]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_excluding(scores, 3, *csr([[2]])), [[1, 0, -1]])


def test_top_k_excluding_random_ties_match_reference():
    rng = np.random.default_rng(7)
    n_users, n_items = 40, 60
    scores = (rng.integers(-5, 6, size=(n_users, n_items)) / 4).astype(np.float32)  # many ties
    excluded = [
        sorted(rng.choice(n_items, size=rng.integers(0, 50), replace=False).tolist()) for _ in range(n_users)
    ]
    for k in (1, 10, 15, 59, 60, 80):
        got = top_k_excluding(scores, k, *csr(excluded))
        np.testing.assert_array_equal(got, reference_top_k(scores, k, excluded), err_msg=f"k={k}")


def test_top_k_excluding_rejects_nan_and_out_of_range_exclusions():
    with pytest.raises(ValueError, match="NaN"):
        top_k_excluding(np.array([[np.nan, 1.0]], dtype=np.float32), 1, *csr([[]]))
    with pytest.raises(ValueError, match="n_items"):
        top_k_excluding(np.zeros((1, 2), dtype=np.float32), 1, *csr([[2]]))


def test_top_k_excluding_batches_with_csr_slice():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((10, 30)).astype(np.float32)
    indptr, items = csr([rng.choice(30, 5, replace=False).tolist() for _ in range(10)])
    whole = top_k_excluding(scores, 8, indptr, items)
    batches = [
        top_k_excluding(scores[start : start + 4], 8, *csr_slice(indptr, items, start, min(start + 4, 10)))
        for start in (0, 4, 8)
    ]
    np.testing.assert_array_equal(np.vstack(batches), whole)
