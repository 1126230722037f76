"""models/csr.py: per-user item sets as CSR."""

from __future__ import annotations

import math

import numpy as np
import pytest
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


# --------------------------------------------------------------------------- CSR, standard error


def test_csr_from_pairs_is_stable_and_keeps_empty_rows():
    indptr, items = csr_from_pairs(np.array([2, 0, 2, 0, 2]), np.array([9, 8, 7, 6, 5], dtype=np.int32), 4)
    np.testing.assert_array_equal(indptr, [0, 2, 2, 5, 5])
    np.testing.assert_array_equal(items, [8, 6, 9, 7, 5])  # input order within each row
    assert indptr.dtype == np.int64 and items.dtype == np.int32
    with pytest.raises(ValueError):
        csr_from_pairs(np.array([0, 4]), np.array([1, 2]), 4)
