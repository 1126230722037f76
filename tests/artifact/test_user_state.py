"""User state -> model inputs (slimrec.artifact.user_state) by hand, and the same inputs for the same
user from training, from the served model and from a request, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.artifact import load_artifact
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.user_state import (
    csr_rows,
    empty_csr,
    gather_ranges,
    history_window,
    lists_as_csr,
    sent_history_window,
    sent_user_features,
    user_codes,
    user_feature_rows,
    user_inputs,
)
from slimrec.models.features import build_feature_space
from slimrec.models.fold import FIT_TRAIN_VALID, Fold
from slimrec.models.split import protocol_split
from slimrec.serving.queries import build_query, user_batch
from slimrec.serving.variants import load_variant

# --- a tiny fitted CSR ------------------------------------------------------------------------------
#
# Three users, items as indices (codes = index + 1), oldest first:
#   user 0: items 2, 0, 3 (codes 3, 1, 4)   rows 0..2
#   user 1: nothing                         (empty row)
#   user 2: items 1, 4    (codes 2, 5)      rows 3..4

INDPTR = np.array([0, 3, 3, 5], np.int64)
ITEMS = np.array([2, 0, 3, 1, 4], np.int32)  # int32, as the artifact stores them
# Side features by user code (row 0: the unknown user), int32 as the artifact stores them.
FEATURE_TABLE = np.array([[0, 0, 0, 0], [3, 1, 2, 2], [0, 2, 1, 1], [7, 1, 0, 0]], np.int32)


def assert_identical(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(a, b)


def test_history_window_at_the_end_of_each_users_items():
    # N = 2: the last two codes, right-aligned; user 1 has none, all padding.
    got = history_window(ITEMS, INDPTR[:-1], INDPTR[1:], 2)
    assert got.dtype == np.int64
    assert got.tolist() == [[1, 4], [0, 0], [2, 5]]
    # N = 4: wider than any user's items, 0-padded on the left, never reaching into the previous user.
    assert history_window(ITEMS, INDPTR[:-1], INDPTR[1:], 4).tolist() == [
        [0, 3, 1, 4],
        [0, 0, 0, 0],
        [0, 0, 2, 5],
    ]


def test_history_window_before_a_position_leaves_the_row_out():
    # Training's cut: user 0 before row 1 (sees only row 0, code 3); user 2 before row 3 (its first
    # row: nothing) and before row 4 (sees row 3, code 2).
    got = history_window(ITEMS, np.array([0, 3, 3]), np.array([1, 3, 4]), 3)
    assert got.tolist() == [[0, 0, 3], [0, 0, 0], [0, 0, 2]]


def test_history_window_of_no_items_is_all_padding():
    got = history_window(np.zeros(0, np.int32), np.array([0, 0]), np.array([0, 0]), 3)
    assert got.dtype == np.int64 and got.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_sent_history_window_lays_out_lists_as_the_fitted_window_does():
    # The three users' items sent as lists: the same window as from the CSR.
    lists = [np.array([2, 0, 3]), np.array([], np.int64), np.array([1, 4])]
    got = sent_history_window(lists, 2)
    assert got.dtype == np.int64
    assert got.tolist() == [[1, 4], [0, 0], [2, 5]]
    assert_identical(got, history_window(ITEMS, INDPTR[:-1], INDPTR[1:], 2))
    # Longer than N: only the most recent N.
    assert sent_history_window([np.array([5, 6, 7, 8])], 2).tolist() == [[8, 9]]


def test_csr_rows_gathers_users_seen_items_in_order_and_dtype():
    indptr, items = csr_rows(INDPTR, ITEMS, np.array([2, 0]))
    assert indptr.dtype == np.int64 and items.dtype == np.int32  # values keep the table's dtype
    assert indptr.tolist() == [0, 2, 5]
    assert items.tolist() == [1, 4, 2, 0, 3]  # user 2's, then user 0's, each oldest first
    indptr, items = csr_rows(INDPTR, ITEMS, np.array([1]))
    assert indptr.tolist() == [0, 0] and items.tolist() == []


def test_gather_ranges_takes_any_ranges():
    # user 0's first two items, then user 2's last one
    indptr, items = gather_ranges(ITEMS, np.array([0, 4]), np.array([2, 5]))
    assert indptr.tolist() == [0, 2, 3] and items.tolist() == [2, 0, 4]
    indptr, items = gather_ranges(ITEMS, np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert indptr.tolist() == [0] and items.tolist() == []


def test_empty_csr_and_lists_as_csr():
    indptr, items = empty_csr(2)
    assert (indptr.dtype, items.dtype) == (np.int64, np.int64)
    assert indptr.tolist() == [0, 0, 0] and items.tolist() == []
    indptr, items = lists_as_csr([np.array([3, 1]), np.array([], np.int64), np.array([5])])
    assert (indptr.dtype, items.dtype) == (np.int64, np.int64)
    assert indptr.tolist() == [0, 2, 2, 3] and items.tolist() == [3, 1, 5]


def test_user_codes_and_feature_rows():
    codes = user_codes(np.array([0, 2, -1], np.int32))  # -1: an unknown user
    assert codes.dtype == np.int64 and codes.tolist() == [1, 3, 0]
    rows = user_feature_rows(FEATURE_TABLE, codes)
    assert rows.dtype == np.int64
    assert rows.tolist() == [[3, 1, 2, 2], [7, 1, 0, 0], [0, 0, 0, 0]]  # code 0: the all-zero row


def test_sent_user_features_encode_like_the_fitted_table():
    space = FeatureSpace(
        n_users=3, n_items=5, genders=["F", "M"], occupations=["doctor", "writer"], zip_prefixes=["12", "94"]
    )
    got = sent_user_features(
        space,
        [
            {"age": 30, "gender": "M", "occupation": "writer", "zip_code": "94043"},  # 3, 2, 2, 2
            {},  # nothing sent: all unknown
            {"age": None, "gender": None, "occupation": "pilot", "zip_code": "12345"},  # 0, 0, 0 (unseen), 1
        ],
    )
    assert got.dtype == np.int64
    assert got.tolist() == [[3, 2, 2, 2], [0, 0, 0, 0], [0, 0, 0, 1]]


def test_user_inputs_of_known_users():
    users = np.array([2, 0])
    inputs = user_inputs(users, FEATURE_TABLE, ITEMS, INDPTR[users], INDPTR[users + 1], 3)
    assert [a.dtype for a in inputs] == [np.int64] * 3
    assert inputs.codes.tolist() == [3, 1]
    assert inputs.features.tolist() == [[7, 1, 0, 0], [3, 1, 2, 2]]
    assert inputs.history.tolist() == [[0, 2, 5], [3, 1, 4]]


# --- one user, three paths: training, the served model, a request -------------------------------------


@pytest.fixture(scope="module")
def fitted_fold(tiny_teacher, ml100k) -> Fold:
    """The fold the served model was fitted on (the refit on train + valid)."""
    history_len = load_artifact(tiny_teacher).config["train"]["history_len"]
    space = build_feature_space(ml100k, history_len)
    return Fold.create(FIT_TRAIN_VALID, ml100k, protocol_split(ml100k), space)


@pytest.fixture(scope="module")
def variant(tiny_teacher):
    return load_variant("full", tiny_teacher)


def in_query_order(batch, order: list[int]):
    """codes, features, history of a `user_batch` answer, rows put back in query order."""
    rows = np.argsort(order)
    return batch.codes[rows], batch.features[rows], batch.history[rows]


@pytest.mark.slow
def test_a_user_gets_the_same_inputs_in_training_and_in_serving(fitted_fold, variant):
    fold, model = fitted_fold, variant.model
    users = fold.eval_users
    assert len(users) == 943
    trained = fold.user_state(users)  # what evaluation feeds, and training at the end of the fitted rows
    assert_identical(trained.history, fold.inputs_before(users, fold.fitted_end(users)).history)

    served = model.known_users(users)
    for got, want in zip((served.codes, served.features, served.history), trained, strict=True):
        assert_identical(got, want)
    assert_identical(served.exclude_indptr, fold.eval_exclude[0])
    assert_identical(served.exclude_items, fold.eval_exclude[1])

    # A request of each known user, batched as the server batches them.
    user_ids = list(variant.user_index)
    assert [variant.user_index[u] for u in user_ids] == list(range(len(user_ids)))
    assert user_ids == list(fold.dataset.users.raw_ids)
    queries = [build_query(variant, user_ids[u], k=10) for u in users]
    batch, order = user_batch(variant, queries)
    for got, want in zip(in_query_order(batch, order), trained, strict=True):
        assert_identical(got, want)


@pytest.mark.slow
def test_an_unknown_user_sending_a_fitted_history_gets_that_history(fitted_fold, variant):
    fold = fitted_fold
    users = fold.eval_users
    trained = fold.user_state(users)
    start, end = fold.split.user_start[users], fold.fitted_end(users)
    raw = fold.dataset.users
    queries = []
    for u, s, e in zip(users, start, end, strict=True):
        history = [variant.item_ids[i] for i in fold.split.item[s:e]]
        sent = {
            "age": int(raw.age[u]),
            "gender": raw.gender[u],
            "occupation": raw.occupation[u],
            "zip_code": raw.zip_code[u],
        }
        queries.append(build_query(variant, f"unknown-{u}", k=10, history=history, features=sent))
    assert all(q.user is None for q in queries)
    batch, order = user_batch(variant, queries)
    codes, features, history = in_query_order(batch, order)
    assert_identical(history, trained.history)
    assert_identical(codes, np.zeros(len(users), np.int64))
    assert_identical(features, trained.features)  # the sent raw features encode to the fitted rows
    # Without side features the user is all unknown, and the history is still the same.
    bare = [
        build_query(variant, f"unknown-{i}", k=10, history=[variant.item_ids[j] for j in q.extra])
        for i, q in enumerate(queries)
    ]
    batch, order = user_batch(variant, bare)
    codes, features, history = in_query_order(batch, order)
    assert_identical(history, trained.history)
    assert_identical(features, np.zeros_like(trained.features))
