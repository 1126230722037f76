"""Known users' embeddings computed once at load: lone answers are bit-for-bit those of the tower.

The golden compressed artifact's user tower quantizes its activations per batch, so the cache
must hold what a lone request computes (each user embedded alone), not a batch's rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from slimrec.artifact.runtime import UserBatch
from slimrec.serving.queries import build_query, run_queries, user_batch
from slimrec.serving.variants import load_variant

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"


@pytest.fixture(scope="module")
def variant():
    return load_variant("compressed", GOLDEN)


def test_the_cache_holds_each_known_users_lone_embedding(variant):
    model = variant.model
    assert model.user_embeddings is not None and model.user_embeddings.shape == (
        model.n_users,
        model.index.dim,
    )
    for user in (0, 195, model.n_users - 1):
        alone = model.embed(model.known_users(np.array([user])))
        np.testing.assert_array_equal(model.user_embeddings[user], alone[0])


def test_lone_answers_are_unchanged_by_the_cache(variant):
    users = [str(u) for u in (1, 22, 196, 300, 943)]
    queries = [build_query(variant, u, 20) for u in users]
    queries += [
        build_query(variant, "5", 10, exclude_seen=False),
        build_query(variant, "7", 10, include_genres=["Comedy"]),
    ]
    cached = [run_queries(variant, [q], 200)[0] for q in queries]
    kept, variant.model.user_embeddings = variant.model.user_embeddings, None
    try:
        computed = [run_queries(variant, [q], 200)[0] for q in queries]
    finally:
        variant.model.user_embeddings = kept
    for a, b in zip(cached, computed, strict=True):
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_array_equal(a.scores, b.scores)
    assert cached[0].timings["embed"] < computed[0].timings["embed"]  # the tower did not run


def test_rows_with_a_history_go_through_the_tower_beside_cached_rows(variant):
    ids = variant.item_ids
    queries = [
        build_query(variant, "1", 10),
        build_query(variant, "new-a", 10, history=[ids[10], ids[20]]),
        build_query(variant, "196", 10, history=[ids[0]]),  # a known user with a history: not cached
        build_query(variant, "2", 10),
    ]
    batch, order = user_batch(variant, queries)
    model = variant.model
    assert batch.embeddings is not None
    cached = ~np.isnan(batch.embeddings[:, 0])
    assert [order[i] for i in np.flatnonzero(cached)] == [0, 3]
    vectors = model.user_vectors(batch)
    np.testing.assert_array_equal(vectors[cached], batch.embeddings[cached])
    rest = np.flatnonzero(~cached)  # through the tower together, as one batch of their own
    empty = np.zeros(len(rest) + 1, np.int64), np.zeros(0, np.int64)
    tower = model.embed(UserBatch(batch.codes[rest], batch.features[rest], batch.history[rest], *empty))
    np.testing.assert_array_equal(vectors[rest], tower)
    assert not np.isnan(vectors).any()
