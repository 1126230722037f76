"""Feature codes, histories, and the Fold's tables and evaluation sets on a hand-built dataset."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from slimrec.artifact.features import AGE_EDGES, YEAR_EDGES, FeatureSpace, age_bucket, year_bucket, zip_prefix
from slimrec.artifact.user_state import history_window
from slimrec.models.data import build_dataset
from slimrec.models.features import build_feature_space, user_feature_table
from slimrec.models.fold import FIT_TRAIN, FIT_TRAIN_VALID, Fold
from slimrec.models.split import protocol_split

# --- buckets ------------------------------------------------------------------------------------
#
# AGE_EDGES = (18, 25, 35, 45, 50, 56): bucket = 1 + (number of edges <= age), 0 for unknown (< 0).


@pytest.mark.parametrize(
    ("age", "bucket"),
    [
        (-1, 0),  # unknown
        (0, 1),
        (17, 1),  # below the first edge
        (18, 2),
        (24, 2),  # an edge opens its bucket
        (25, 3),
        (34, 3),
        (35, 4),
        (45, 5),
        (49, 5),
        (50, 6),
        (55, 6),
        (56, 7),
        (120, 7),  # at and past the last edge
    ],
)
def test_age_bucket_edges(age, bucket):
    assert AGE_EDGES == (18, 25, 35, 45, 50, 56)
    assert age_bucket(np.array([age])).tolist() == [bucket]


# YEAR_EDGES = 1930, 1935, ..., 2030 (21 edges): same rule, buckets 0..22.


@pytest.mark.parametrize(
    ("year", "bucket"),
    [
        (-1, 0),
        (1900, 1),
        (1929, 1),
        (1930, 2),
        (1934, 2),
        (1935, 3),
        (1995, 15),  # edges <= 1995: 1930..1995 = 14 -> 15
        (2029, 21),
        (2030, 22),
        (2100, 22),
    ],
)
def test_year_bucket_edges(year, bucket):
    assert len(YEAR_EDGES) == 21 and (YEAR_EDGES[0], YEAR_EDGES[-1]) == (1930, 2030)
    assert year_bucket(np.array([year])).tolist() == [bucket]


def test_bucket_counts_match_vocab_sizes():
    space = FeatureSpace(n_users=1, n_items=1)
    assert space.user_vocab_sizes[0] == 8 == int(age_bucket(np.array([999]))[0]) + 1
    assert space.n_year_buckets == 23 == int(year_bucket(np.array([9999]))[0]) + 1


def test_zip_prefix():
    assert zip_prefix(np.array(["94043", "T8H1N", "", "1"], dtype=object)).tolist() == ["94", "T8", "", "1"]


# --- histories ------------------------------------------------------------------------------------
#
# Two users in protocol order: user A rows 0..2 with item codes 5, 6, 7; user B rows 3..4 with 8, 9
# (item indices 4..8: history_window takes indices and gives codes, index + 1).
# history_len = 3, right-aligned, 0-padded on the left, never reaching into the previous user:
#   A at row 0 (start 0): rows -3..-1    -> [0, 0, 0]
#   A at row 2 (start 0): rows -1, 0, 1  -> [0, 5, 6]
#   A at row 3 (start 0): rows 0, 1, 2   -> [5, 6, 7]   (the end of A: A's whole sequence)
#   B at row 3 (start 3): rows 0, 1, 2   -> [0, 0, 0]   (those are A's rows: masked out)
#   B at row 4 (start 3): rows 1, 2, 3   -> [0, 0, 8]
#   B at row 5 (start 3): rows 2, 3, 4   -> [0, 8, 9]   (the end of B)

HISTORY_ITEMS = np.array([5, 6, 7, 8, 9]) - 1  # indices of codes 5..9


def test_history_window_right_aligned_and_per_user():
    positions = np.array([0, 2, 3, 3, 4, 5])
    starts = np.array([0, 0, 0, 3, 3, 3])
    got = history_window(HISTORY_ITEMS, starts, positions, history_len=3)
    assert got.dtype == np.int64
    assert got.tolist() == [[0, 0, 0], [0, 5, 6], [5, 6, 7], [0, 0, 0], [0, 0, 8], [0, 8, 9]]


def test_history_window_keeps_only_the_most_recent():
    # A at row 3 with history_len 2: the last two of 5, 6, 7.
    assert history_window(HISTORY_ITEMS, np.array([0]), np.array([3]), 2).tolist() == [[6, 7]]
    # history_len 1: the previous item only.
    assert history_window(HISTORY_ITEMS, np.array([3]), np.array([5]), 1).tolist() == [[9]]


# --- the feature space ----------------------------------------------------------------------------

SPACE = FeatureSpace(
    n_users=3,
    n_items=4,
    history_len=7,
    genders=["F", "M"],
    occupations=["doctor", "writer"],
    zip_prefixes=["12", "94"],
    genres=["Comedy", "Drama"],
)


def test_feature_space_round_trip_through_json():
    restored = FeatureSpace.from_dict(json.loads(json.dumps(SPACE.to_dict())))
    assert restored == SPACE
    assert restored.user_vocab_sizes == (8, 3, 3, 3)


def test_feature_space_rejects_empty_history():
    with pytest.raises(ValueError, match="history_len must be >= 1, got 0"):
        FeatureSpace(n_users=1, n_items=1, history_len=0)


def test_encode_user_features_maps_unknown_and_unseen_to_zero():
    codes = SPACE.encode_user_features(
        age=np.array([-1, 30]),
        gender=np.array(["M", "X"], dtype=object),  # "X" never seen
        occupation=np.array(["writer", ""], dtype=object),  # "" = unknown
        zip_code=np.array(["94043", "55555"], dtype=object),  # prefix "55" never seen
    )
    # Row 0: age unknown 0, "M" is vocab entry 2 (1-based), "writer" 2, "94" 2.
    # Row 1: age 30 -> bucket 3 (edges 18, 25 <= 30), everything else 0.
    assert codes.dtype == np.int64
    assert codes.tolist() == [[0, 2, 2, 2], [3, 0, 0, 0]]


# --- a hand-built dataset for the Fold ----------------------------------------------------------
#
# Items "1".."7" (indices 0..6, codes 1..7), users "1", "2", "3" (indices 0..2, codes 1..3).
# user "1": items 1, 2, 3, 4, 5 at t = 10..50 -> n = 5: 1 test, 1 valid -> train 1 2 3 | valid 4 | test 5
# user "2": items 2, 1, 6 at t = 10, 20, 30  -> n = 3: 1 test, 1 valid -> train 2 | valid 1 | test 6
# user "3": metadata only, never rated.
# item "7": metadata only, never rated.
#
# Fit on train (score valid):          fitted items {1, 2, 3}, fitted users {"1", "2"}
# Fit on train + valid (score test):   fitted items {1, 2, 3, 4}, fitted users {"1", "2"}

RATINGS = [
    ("1", "1", 10),
    ("1", "2", 20),
    ("1", "3", 30),
    ("1", "4", 40),
    ("1", "5", 50),
    ("2", "2", 10),
    ("2", "1", 20),
    ("2", "6", 30),
]
USERS = pd.DataFrame(
    {
        "user_id": ["1", "2", "3"],
        "age": [30, -1, 60],
        "gender": ["F", "M", "F"],
        "occupation": ["writer", "doctor", ""],
        "zip_code": ["94043", "12345", ""],
    }
)
ITEMS = pd.DataFrame(
    {
        "item_id": [str(i) for i in range(1, 8)],
        "title": [f"Movie {i}" for i in range(1, 8)],
        "genres": ["Comedy", "Drama", "Comedy|Drama", "", "Drama", "Comedy", "Horror"],
        "year": [1995, 1930, -1, 2000, 1999, 1980, 1950],
    }
)


@pytest.fixture(scope="module")
def hand():
    ratings = pd.DataFrame(
        {
            "user_id": [r[0] for r in RATINGS],
            "item_id": [r[1] for r in RATINGS],
            "rating": np.full(len(RATINGS), 4.0, np.float32),
            "timestamp": np.array([r[2] for r in RATINGS], np.int64),
        }
    )
    dataset = build_dataset("hand", ratings, USERS, ITEMS)
    split = protocol_split(dataset)
    space = build_feature_space(dataset, history_len=4)
    return {name: Fold.create(name, dataset, split, space) for name in (FIT_TRAIN, FIT_TRAIN_VALID)}


def csr_lists(csr) -> list[list[int]]:
    indptr, items = csr
    return [sorted(items[indptr[u] : indptr[u + 1]].tolist()) for u in range(len(indptr) - 1)]


def test_build_feature_space_vocabularies(hand):
    space = hand[FIT_TRAIN].space
    # Sorted, "" (unknown) left out; genres split on "|".
    assert (space.n_users, space.n_items, space.history_len) == (3, 7, 4)
    assert space.genders == ["F", "M"]
    assert space.occupations == ["doctor", "writer"]
    assert space.zip_prefixes == ["12", "94"]
    assert space.genres == ["Comedy", "Drama", "Horror"]


def test_user_feature_table_rows_are_codes(hand):
    fold = hand[FIT_TRAIN]
    # Row 0 = unknown user. "1": age 30 -> 3, F -> 1, writer -> 2, "94" -> 2.
    # "2": age unknown -> 0, M -> 2, doctor -> 1, "12" -> 1.  "3": age 60 -> 7, F -> 1, rest unknown.
    assert user_feature_table(fold.space, fold.dataset).tolist() == [
        [0, 0, 0, 0],
        [3, 1, 2, 2],
        [0, 2, 1, 1],
        [7, 1, 0, 0],
    ]


def test_fold_tables_share_row_zero_for_never_fitted_ids(hand):
    train = hand[FIT_TRAIN].tables
    # Code:                                  0  1  2  3  4  5  6  7
    assert train["item_rows"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]  # 4 is valid-only, 5 and 6 test, 7 unrated
    assert train["user_rows"].tolist() == [0, 1, 2, 0]  # user "3" never rated
    train_valid = hand[FIT_TRAIN_VALID].tables
    assert train_valid["item_rows"].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]  # valid item 4 is now fitted
    assert train_valid["user_rows"].tolist() == [0, 1, 2, 0]


def test_fold_side_feature_tables(hand):
    tables = hand[FIT_TRAIN].tables
    # Genres Comedy, Drama, Horror; row = item code, row 0 = "no item".
    assert tables["item_genres"].tolist() == [
        [0, 0, 0],
        [1, 0, 0],
        [0, 1, 0],
        [1, 1, 0],
        [0, 0, 0],
        [0, 1, 0],
        [1, 0, 0],
        [0, 0, 1],
    ]
    # 1995 -> 15, 1930 -> 2, unknown -> 0, 2000 -> 16, 1999 -> 15, 1980 -> 12, 1950 -> 6.
    assert tables["item_year"].tolist() == [0, 15, 2, 0, 16, 15, 12, 6]


def test_fold_rows_and_counts(hand):
    train, train_valid = hand[FIT_TRAIN], hand[FIT_TRAIN_VALID]
    # Protocol order: user "1" rows 0..4 (items 1..5), user "2" rows 5..7 (items 2, 1, 6).
    assert train.item_codes.tolist() == [1, 2, 3, 4, 5, 2, 1, 6]
    assert train.fit_positions.tolist() == [0, 1, 2, 5]
    assert train_valid.fit_positions.tolist() == [0, 1, 2, 3, 5, 6]
    assert train.fit_counts.tolist() == [3, 1, 0]
    assert train_valid.fit_counts.tolist() == [4, 2, 0]
    assert train.item_popularity.tolist() == [1, 2, 1, 0, 0, 0, 0]  # item 2 fitted by both users
    assert (train.eval_name, train_valid.eval_name) == ("valid", "test")


def test_user_state_history_is_the_last_fitted_items(hand):
    users = np.array([0, 1, 2])
    codes, features, history = hand[FIT_TRAIN].user_state(users)
    assert codes.tolist() == [1, 2, 3]
    assert features.tolist() == [[3, 1, 2, 2], [0, 2, 1, 1], [7, 1, 0, 0]]
    # history_len 4: "1" fitted 1 2 3 -> [0, 1, 2, 3]; "2" fitted 2 -> [0, 0, 0, 2]; "3" nothing.
    assert history.tolist() == [[0, 1, 2, 3], [0, 0, 0, 2], [0, 0, 0, 0]]
    _, _, history = hand[FIT_TRAIN_VALID].user_state(users)
    # Now valid is fitted too: "1" 1 2 3 4; "2" 2 1. Test items (5, 6) never appear.
    assert history.tolist() == [[1, 2, 3, 4], [0, 0, 2, 1], [0, 0, 0, 0]]


def test_eval_exclude_holds_exactly_the_fitted_items(hand):
    train, train_valid = hand[FIT_TRAIN], hand[FIT_TRAIN_VALID]
    # Users with a row in the scored fold: "1" and "2" (indices 0, 1), never the unrated "3".
    assert train.eval_users.tolist() == [0, 1]
    assert train_valid.eval_users.tolist() == [0, 1]
    # Item indices (code - 1): "1" fitted items 1 2 3 -> 0 1 2; "2" fitted item 2 -> 1.
    assert csr_lists(train.eval_exclude) == [[0, 1, 2], [1]]
    assert csr_lists(train_valid.eval_exclude) == [[0, 1, 2, 3], [0, 1]]


def test_eval_relevant_holds_exactly_the_scored_folds_items(hand):
    # Valid: "1" -> item 4 (index 3), "2" -> item 1 (index 0). Test: "1" -> 5 (4), "2" -> 6 (5).
    assert csr_lists(hand[FIT_TRAIN].eval_relevant) == [[3], [0]]
    assert csr_lists(hand[FIT_TRAIN_VALID].eval_relevant) == [[4], [5]]


def test_fold_create_rejects_an_unknown_name(hand):
    fold = hand[FIT_TRAIN]
    with pytest.raises(ValueError, match="unknown fold 'test'"):
        Fold.create("test", fold.dataset, fold.split, fold.space)
