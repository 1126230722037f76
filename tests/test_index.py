"""Recall of an approximate index against exact search: the set intersection and the tie-aware measure."""

from __future__ import annotations

import numpy as np
import pytest

from compression.index import IndexSpec, build_item_index, recall_at_k, recall_within

# One query along x; items at cosines 0.9, 0.8, 0.8 (a tie) and 0.1.
QUERY = np.array([[1.0, 0.0]], np.float32)
ITEMS = np.array([[c, np.sqrt(1 - c * c)] for c in (0.9, 0.8, 0.8, 0.1)], np.float32)
EXACT_SCORES = np.array([[0.9, 0.8]], np.float32)  # exact top-2: item 0, then item 1 or 2


@pytest.mark.parametrize(("found", "strict", "within"), [
    ([0, 1], 1.0, 1.0),
    ([0, 2], 0.5, 1.0),  # item 2 ties with the exact 2nd best: a hit for recall_within only
    ([0, 3], 0.5, 0.5),
    ([3, -1], 0.0, 0.0),  # padding never counts
])
def test_recall_by_hand(found, strict, within):
    found = np.array([found])
    assert recall_at_k(found, np.array([[0, 1]])) == pytest.approx(strict)
    assert recall_within(found, EXACT_SCORES, QUERY, ITEMS) == pytest.approx(within)


def test_a_score_just_outside_the_tolerance_is_a_miss():
    items = ITEMS.copy()
    items[2] = [0.79, np.sqrt(1 - 0.79**2)]
    assert recall_within(np.array([[0, 2]]), EXACT_SCORES, QUERY, items, tolerance=1e-3) == 0.5
    assert recall_within(np.array([[0, 2]]), EXACT_SCORES, QUERY, items, tolerance=0.02) == 1.0


def test_exact_search_has_recall_one_and_ivf_never_beats_it():
    rng = np.random.default_rng(0)
    items = rng.normal(size=(2000, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[rng.choice(2000, 50, replace=False)] + 0.1 * rng.normal(size=(50, 16)).astype(np.float32)
    scores, exact = build_item_index(items, IndexSpec("flat")).search(queries, 20)
    assert recall_at_k(exact, exact) == 1.0
    assert recall_within(exact, scores, queries, items) == 1.0
    found = build_item_index(items, IndexSpec("ivf_sq8", nlist=32, nprobe=1)).search(queries, 20)[1]
    strict, within = recall_at_k(found, exact), recall_within(found, scores, queries, items)
    assert 0 < strict <= within <= 1
