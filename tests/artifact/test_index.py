"""Recall of an approximate index against exact search: the set intersection and the tie-aware measure."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.artifact.index import IndexSpec, ItemIndex, build_item_index, recall_at_k, recall_within

# One query along x; items at cosines 0.9, 0.8, 0.8 (a tie) and 0.1.
QUERY = np.array([[1.0, 0.0]], np.float32)
ITEMS = np.array([[c, np.sqrt(1 - c * c)] for c in (0.9, 0.8, 0.8, 0.1)], np.float32)
EXACT_SCORES = np.array([[0.9, 0.8]], np.float32)  # exact top-2: item 0, then item 1 or 2


@pytest.mark.parametrize(
    ("found", "strict", "within"),
    [
        ([0, 1], 1.0, 1.0),
        ([0, 2], 0.5, 1.0),  # item 2 ties with the exact 2nd best: a hit for recall_within only
        ([0, 3], 0.5, 0.5),
        ([3, -1], 0.0, 0.0),  # padding never counts
    ],
)
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


@pytest.mark.parametrize(
    "spec",
    [
        IndexSpec("flat"),
        IndexSpec("ivf_sq8", nlist=16, nprobe=4),
        IndexSpec("ivf_sq6", nlist=16, nprobe=4),
        IndexSpec("ivf_sq4", nlist=16, nprobe=4),
        IndexSpec("ivf_pq_refine", nlist=16, nprobe=4, pq_m=4),
        IndexSpec("hnsw", hnsw_m=8, ef_search=64),
    ],
    ids=lambda s: s.kind,
)
def test_a_filtered_search_returns_only_allowed_items(spec):
    rng = np.random.default_rng(1)
    items = rng.normal(size=(3000, 16)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    allowed = rng.random(3000) < 0.2
    index = build_item_index(items, spec)
    scores, ids = index.search(queries, 30, allowed)
    assert ((ids < 0) | allowed[np.maximum(ids, 0)]).all()
    assert (ids >= 0).mean() > 0.9  # a filter narrows the candidates, it does not empty the answer
    unfiltered = index.search(queries, 30)[1]
    assert not ((unfiltered < 0) | allowed[np.maximum(unfiltered, 0)]).all()  # the filter did something
    if spec.kind == "flat":  # exact: the best allowed items, in order
        expected = np.argsort(-(queries @ items.T + np.where(allowed, 0, -10)), axis=1, kind="stable")[:, :30]
        np.testing.assert_array_equal(ids, expected)


def test_fewer_code_bits_make_a_smaller_index_that_still_finds_the_neighbours(tmp_path):
    rng = np.random.default_rng(3)
    items = rng.normal(size=(4000, 32)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries = items[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    exact = build_item_index(items, IndexSpec("flat")).search(queries, 50)[1]
    sizes = {}
    for kind in ("ivf_sq8", "ivf_sq6", "ivf_sq4"):
        index = build_item_index(items, IndexSpec(kind, nlist=16, nprobe=16))  # all lists: only codes differ
        sizes[kind] = index.memory_bytes()
        assert recall_at_k(index.search(queries, 50)[1], exact) > 0.8, kind
        index.save(tmp_path / f"{kind}.faiss")
        reloaded = ItemIndex.load(tmp_path / f"{kind}.faiss", index.spec)
        np.testing.assert_array_equal(reloaded.search(queries, 50)[1], index.search(queries, 50)[1])
    two_bits_a_dimension = 4000 * 32 * 2 // 8  # ids, centroids and quantizer ranges are alike
    assert sizes["ivf_sq8"] - sizes["ivf_sq6"] == sizes["ivf_sq6"] - sizes["ivf_sq4"] == two_bits_a_dimension


def test_an_ivf_filter_keeps_the_allowed_items_of_the_probed_lists():
    rng = np.random.default_rng(2)
    items = rng.normal(size=(2000, 8)).astype(np.float32)
    queries = rng.normal(size=(10, 8)).astype(np.float32)
    allowed = rng.random(2000) < 0.3
    index = build_item_index(items, IndexSpec("ivf_sq8", nlist=16, nprobe=2))
    deep_scores, deep = index.search(queries, 2000)  # the old way: search deep, then drop
    filtered = index.search(queries, 50, allowed)[1]
    for row, found in zip(deep, filtered, strict=True):
        kept = row[(row >= 0) & allowed[np.maximum(row, 0)]][:50]
        assert set(found[found >= 0]) == set(kept)


@pytest.mark.parametrize("dense_cells", [1 << 22, 0], ids=["dense-mask", "sorted-keys"])
def test_seen_items_are_dropped_and_the_rest_kept_in_order(monkeypatch, dense_cells):
    """ServedModel.retrieve's exclusion: each row keeps its first n items that are neither
    padding (-1) nor in that row's excluded set, in search order, padded with -1 / -inf."""
    from slimrec.artifact import runtime

    monkeypatch.setattr(runtime, "DENSE_MEMBER_CELLS", dense_cells)
    rng = np.random.default_rng(4)
    n_items, n = 300, 40
    lengths = rng.integers(0, 120, size=12)
    lengths[0] = 280  # a heavy user: fewer than n items survive
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    members = np.concatenate([rng.choice(n_items, k, replace=False) for k in lengths]).astype(np.int64)
    items = np.stack([rng.permutation(n_items)[:150] for _ in lengths]).astype(np.int64)
    items[:, -7:] = -1  # FAISS's padding
    scores = -np.sort(-rng.random(items.shape).astype(np.float32), axis=1)
    drop = (items < 0) | runtime._member_rows(items, indptr, members, n_items)
    kept_items, kept_scores = runtime._compact(items, scores, drop, n)
    for row, (start, stop) in enumerate(zip(indptr[:-1], indptr[1:], strict=True)):
        seen = set(members[start:stop])
        pairs = zip(items[row], scores[row], strict=True)
        expected = [(i, s) for i, s in pairs if i >= 0 and i not in seen][:n]
        got = [(i, s) for i, s in zip(kept_items[row], kept_scores[row], strict=True) if i >= 0]
        assert got == expected
        assert (kept_items[row, len(got) :] == -1).all() and np.isneginf(kept_scores[row, len(got) :]).all()
    assert (kept_items == -1).any() and (kept_items >= 0).sum(1).max() == n  # both cases occur


def test_retrieval_searches_deeper_only_the_rows_that_need_it(tiny_teacher, monkeypatch):
    """Two passes (a shallow one for the batch, a deep one for rows short of n after dropping
    their seen items) give what one search as deep as the heaviest row needs gives."""
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel

    model = ServedModel(load_artifact(tiny_teacher))
    searches, search = [], model.index.search

    def counted_search(queries, k, allowed=None):
        searches.append(k)
        return search(queries, k, allowed)

    monkeypatch.setattr(model.index, "search", counted_search)
    users = np.arange(model.n_users)
    allowed = np.random.default_rng(0).random(model.n_items) < 0.5
    passes = []
    for n, filtered in ((200, None), (20, None), (100, allowed)):
        for start in range(0, len(users), 16):
            batch = model.known_users(users[start : start + 16])
            emb = model.embed(batch)
            searches.clear()
            got = model.retrieve(emb, n, batch, filtered)
            passes.append(len(searches))
            deepest = min(model.n_items, n + int(np.diff(batch.exclude_indptr).max()))
            expected = model._search_excluding(emb, deepest, n, batch, filtered)
            np.testing.assert_array_equal(got[0], expected[0])
            np.testing.assert_array_equal(got[1], expected[1])
    assert set(passes) == {1, 2}  # some batches were answered by the first pass, some needed two
