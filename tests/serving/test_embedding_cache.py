"""Known users' embeddings and retrieval candidates computed once at load: answers are
bit-for-bit those of the tower and the index.

The golden compressed artifact's user tower quantizes its activations per batch, so the cache
must hold what a lone request computes (each user embedded alone), not a batch's rows; the fp32
teacher's rows do not depend on their batch, so its users are embedded many a call. The cache is
built only where batches run: in process, in each model process, not in the `--model-process`
parent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from slimrec.artifact.runtime import UserBatch
from slimrec.serving.app import create_app
from slimrec.serving.model_process import ModelProcesses
from slimrec.serving.queries import build_query, run_queries, user_batch
from slimrec.serving.settings import Settings
from slimrec.serving.variants import load_variant

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"


@pytest.fixture(scope="module")
def variant():
    return load_variant("compressed", GOLDEN, cache_known_users=True)


def lone_embeddings(model) -> np.ndarray:
    """[n_users, D]: each known user through the tower alone, as a lone request."""
    return np.concatenate([model.embed(model.known_users(np.array([u]))) for u in range(model.n_users)])


def test_the_cache_holds_each_known_users_lone_embedding(variant):
    model = variant.model
    assert model.user_embeddings is not None and model.user_embeddings.shape == (
        model.n_users,
        model.index.dim,
    )
    assert not model.batch_independent()  # int8 activations scaled per batch: one user a call
    np.testing.assert_array_equal(model.user_embeddings, lone_embeddings(model))
    together = model.embed(model.known_users(np.arange(256)))
    assert (together != model.user_embeddings[:256]).any(axis=1).all()  # batched rows all differ


def test_a_batch_independent_tower_is_cached_many_users_a_call(tiny_teacher):
    model = load_variant("full", tiny_teacher, cache_known_users=True).model
    assert model.batch_independent()  # fp32: a row does not depend on the rest of its batch
    assert model.user_embeddings is not None
    np.testing.assert_array_equal(model.user_embeddings, lone_embeddings(model))
    # A batch size that leaves a short last call gives the same cache.
    kept = model.user_embeddings
    assert model.cache_user_embeddings(batch_size=100) and model.n_users % 100
    np.testing.assert_array_equal(model.user_embeddings, kept)
    rebuilt = model.user_embeddings
    assert not model.cache_user_embeddings(max_users=model.n_users - 1)  # too many users: not built
    assert model.user_embeddings is rebuilt


def test_a_variant_loaded_without_the_cache_has_none(tiny_teacher):
    assert load_variant("full", tiny_teacher).model.user_embeddings is None


def fastest_embed(run, queries, repeats: int = 5) -> float:
    """The least embed time of `repeats` runs of `queries` (the noise of a busy machine only adds)."""
    return min(run(queries, 200)[0].timings["embed"] for _ in range(repeats))


@pytest.mark.parametrize("model_process", [False, True], ids=["in-process", "model-process"])
def test_the_cache_is_built_where_batches_run(tiny_teacher, model_process):
    app = create_app(Settings(variants={"full": tiny_teacher}, model_process=model_process))
    with TestClient(app):
        served = app.state.service.variants["full"].variant
        # The model-process parent only checks requests and answers the popularity fallback.
        assert (served.model.user_embeddings is None) == model_process
    if not model_process:
        return
    # Each child has it: a known user without a history skips the tower, one with a history runs it.
    processes = ModelProcesses("full", served.path, size=1, ort_threads=1, index_threads=1)
    try:
        item = served.item_ids[0]
        cached = fastest_embed(processes.run, [build_query(served, "196", 10)])
        tower = fastest_embed(processes.run, [build_query(served, "196", 10, history=[item])])
        assert cached * 5 < tower, (cached, tower)
    finally:
        processes.close()


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


def answers_without_candidate_cache(variant, batches, n_candidates):
    kept, variant.model.user_candidates = variant.model.user_candidates, None
    try:
        return [run_queries(variant, batch, n_candidates) for batch in batches]
    finally:
        variant.model.user_candidates = kept


def test_the_candidate_cache_holds_each_known_users_lone_retrieval(variant):
    model = variant.model
    assert model.user_candidates is not None
    items, scores = model.user_candidates
    assert items.shape == scores.shape == (model.n_users, model.n_candidates)
    kept, model.user_candidates = model.user_candidates, None
    try:
        for user in (0, 1, 195, model.n_users - 1):
            batch = model.known_users(np.array([user]))
            alone = model.retrieve(model.user_vectors(batch), model.n_candidates, batch)
            np.testing.assert_array_equal(items[user], alone[0][0])
            np.testing.assert_array_equal(scores[user], alone[1][0])
    finally:
        model.user_candidates = kept
    seen = model.fitted_items[model.fitted_indptr[195] : model.fitted_indptr[196]]
    assert not np.isin(items[195], seen).any()  # fitted items excluded


def test_answers_are_unchanged_by_the_candidate_cache(variant):
    """Cached rows beside rows that must be searched: a sent history, exclude_seen off, a genre
    filter, more items than the budget."""
    ids = variant.item_ids
    budget = variant.model.n_candidates
    batches = [
        [build_query(variant, u, k) for u, k in (("1", 10), ("22", 50), ("943", 100))],
        [
            build_query(variant, "1", 10),
            build_query(variant, "196", 10, history=[ids[0]]),
            build_query(variant, "new-a", 20, history=[ids[10], ids[20]]),
            build_query(variant, "5", 10, exclude_seen=False),
            build_query(variant, "7", 10, include_genres=["Comedy"]),
            build_query(variant, "300", 30),
        ],
        [build_query(variant, "2", budget + 5), build_query(variant, "3", 10)],
    ]
    for n_candidates in (budget, budget // 2, budget + 10):
        cached = [run_queries(variant, batch, n_candidates) for batch in batches]
        searched = answers_without_candidate_cache(variant, batches, n_candidates)
        for got, want in zip(sum(cached, []), sum(searched, []), strict=True):
            np.testing.assert_array_equal(got.items, want.items)
            np.testing.assert_array_equal(got.scores, want.scores)


def test_only_plain_known_users_carry_cached_candidates(variant):
    ids = variant.item_ids
    queries = [
        build_query(variant, "1", 10),
        build_query(variant, "196", 10, history=[ids[0]]),
        build_query(variant, "5", 10, exclude_seen=False),
        build_query(variant, "2", 10),
    ]
    batch, order = user_batch(variant, queries)
    assert batch.candidates is not None
    carried = ~np.isnan(batch.candidates[1][:, 0])
    assert sorted(order[i] for i in np.flatnonzero(carried)) == [0, 3]


def test_a_cache_over_its_byte_budget_is_not_built(tiny_teacher):
    model = load_variant("full", tiny_teacher, cache_known_users=True).model
    assert model.user_candidates is not None
    needed = model.n_users * model.n_candidates * 8
    assert not model.cache_user_candidates(max_bytes=needed - 1)
    assert model.cache_user_candidates(max_bytes=needed)
    assert load_variant("full", tiny_teacher).model.user_candidates is None
    assert not model.cache_user_candidates(max_seconds=0.0)  # building would take too long
    assert model.user_candidates is None


def test_retrieve_takes_carried_rows_without_searching(variant):
    model = variant.model
    kept = model.user_candidates
    assert kept is not None
    marked = (np.roll(kept[0], 1, axis=1), kept[1] - 1.0)  # not what the index would return
    model.user_candidates = marked
    try:
        batch = model.known_users(np.array([3, 4]))
        items, scores = model.retrieve(model.user_vectors(batch), 50, batch)
    finally:
        model.user_candidates = kept
    np.testing.assert_array_equal(items, marked[0][[3, 4], :50])
    np.testing.assert_array_equal(scores, marked[1][[3, 4], :50])
