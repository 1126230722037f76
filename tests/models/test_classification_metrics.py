"""models/classification_metrics.py: AUC and log loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
from slimrec.models.classification_metrics import auc, log_loss
from slimrec.models.csr import csr_from_pairs


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


# --------------------------------------------------------------------------- AUC, log loss


def brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positives, negatives = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    return wins / (len(positives) * len(negatives))


def test_auc_matches_pairwise_count_with_ties():
    rng = np.random.default_rng(11)
    for _ in range(5):
        labels = rng.integers(0, 2, size=300)
        scores = rng.integers(0, 8, size=300).astype(np.float32) + 0.3 * labels  # ties + signal
        assert auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_known_values_and_single_class():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    assert auc(np.array([True, False]), [1.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both classes"):
        auc([0, 0], [0.1, 0.2])


def test_log_loss_matches_formula_and_clips():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=200)
    probabilities = rng.uniform(0.01, 0.99, size=200)
    expected = -np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities))
    assert log_loss(labels, probabilities) == pytest.approx(expected, rel=1e-12)
    # A confident miss costs -log(eps), not infinity.
    assert log_loss([1, 0], [0.0, 1.0], eps=1e-7) == pytest.approx(-math.log(1e-7))
    with pytest.raises(ValueError):
        log_loss([1, 0], [0.5, 1.5])
