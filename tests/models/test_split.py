"""The per-user temporal split of PROTOCOL.md: a hand-built dataset, then the real ML-100K."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slimrec.models.data import build_dataset
from slimrec.models.split import TEST, TRAIN, VALID, holdout_sizes, protocol_split

FOLD_NAME = {TRAIN: "train", VALID: "valid", TEST: "test"}


def ratings_frame(rows: list[tuple[str, str, int]]) -> pd.DataFrame:
    """(user_id, item_id, timestamp) rows -> a ratings table (rating 4.0 everywhere)."""
    users, items, stamps = zip(*rows, strict=True)
    return pd.DataFrame(
        {
            "user_id": list(users),
            "item_id": list(items),
            "rating": np.full(len(rows), 4.0, np.float32),
            "timestamp": np.array(stamps, np.int64),
        }
    )


def folds_by_user(dataset, split) -> dict[str, dict[str, list[str]]]:
    """{raw user id: {"train": [raw item ids in protocol order], "valid": [...], "test": [...]}}."""
    out: dict[str, dict[str, list[str]]] = {}
    for u, raw_user in enumerate(dataset.users.raw_ids):
        rows = slice(split.user_start[u], split.user_start[u + 1])
        per_fold: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        for item, fold in zip(split.item[rows], split.fold[rows], strict=True):
            per_fold[FOLD_NAME[int(fold)]].append(str(dataset.items.raw_ids[item]))
        out[str(raw_user)] = per_fold
    return out


# --- holdout sizes: max(1, round(0.1 n)) with Python's banker's rounding -------------------------


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, 1),  # 0.1 -> round 0 -> max(1, 0) = 1
        (5, 1),  # 0.5 -> round half to even: 0 -> max(1, 0) = 1
        (14, 1),  # 1.4 -> 1
        (15, 2),  # 1.5 -> half to even: 2
        (25, 2),  # 2.5 -> half to even: 2 (not 3)
        (35, 4),  # 0.1 * 35 == 3.5 exactly in floating point -> half to even: 4
        (45, 4),  # 0.1 * 45 == 4.5 exactly -> half to even: 4
        (75, 8),  # 7.5 -> half to even: 8
        (105, 10),  # 10.5 -> half to even: 10
    ],
)
def test_holdout_sizes_round_like_python(n, expected):
    n_valid, n_test = holdout_sizes(np.array([n]))
    assert (int(n_valid[0]), int(n_test[0])) == (expected, expected)


def test_holdout_sizes_match_python_round_for_every_n_up_to_5000():
    n = np.arange(1, 5001)
    n_valid, n_test = holdout_sizes(n)
    # 0.1 * n lands exactly on .5 for every n ending in 5 here, so these are all true ties.
    assert all(0.1 * k == k / 10 for k in range(5, 5001, 10))
    reference = [max(1, round(0.1 * k)) for k in range(1, 5001)]
    assert n_valid.tolist() == reference
    assert n_test.tolist() == reference


# --- a hand-built dataset ------------------------------------------------------------------------
#
# User "7", 5 interactions, given out of order; item ids compare as numbers ("9" < "10"):
#     (item, timestamp): ("10", 300) ("9", 300) ("2", 100) ("7", 200) ("1", 400)
#     sorted by (timestamp, item): 2@100, 7@200, 9@300, 10@300, 1@400
#     n = 5: round(0.5) = 0 -> 1 test, 1 valid
#     train [2, 7, 9], valid [10], test [1]   (string order would have put "10" before "9")
#
# Users "20" (n = 15), "3" (n = 25), "100" (n = 35): item j = 1..n at timestamp (j + 1) // 2, so
# items come in tied pairs (1), (2, 3), (4, 5), ...; rows are given newest first, so only the
# item-id tie break restores the order 1, 2, ..., n. Each fold boundary cuts through a tied pair:
#     n = 15: round(1.5) = 2  -> train 1..11, valid 12..13, test 14..15  (pairs (11,12), (13,14))
#     n = 25: round(2.5) = 2  -> train 1..21, valid 22..23, test 24..25  (pairs (21,22), (23,24))
#     n = 35: round(3.5) = 4  -> train 1..27, valid 28..31, test 32..35  (pairs (27,28), (31,32))
# User ids sort numerically too: "3" < "7" < "20" < "100".


def paired_rows(user: str, n: int) -> list[tuple[str, str, int]]:
    return [(user, str(j), (j + 1) // 2) for j in range(n, 0, -1)]


def ids(first: int, last: int) -> list[str]:
    return [str(j) for j in range(first, last + 1)]


@pytest.fixture(scope="module")
def hand():
    user_7 = [("7", "10", 300), ("7", "9", 300), ("7", "2", 100), ("7", "7", 200), ("7", "1", 400)]
    rows = paired_rows("20", 15) + user_7[:2] + paired_rows("3", 25) + user_7[2:] + paired_rows("100", 35)
    dataset = build_dataset("hand", ratings_frame(rows))
    return dataset, protocol_split(dataset)


def test_hand_split_folds(hand):
    dataset, split = hand
    assert folds_by_user(dataset, split) == {
        "3": {"train": ids(1, 21), "valid": ids(22, 23), "test": ids(24, 25)},
        "7": {"train": ["2", "7", "9"], "valid": ["10"], "test": ["1"]},
        "20": {"train": ids(1, 11), "valid": ids(12, 13), "test": ids(14, 15)},
        "100": {"train": ids(1, 27), "valid": ids(28, 31), "test": ids(32, 35)},
    }


def test_hand_split_bookkeeping(hand):
    dataset, split = hand
    inter = dataset.interactions
    # Users are indexed "3", "7", "20", "100" with 25, 5, 15, 35 rows.
    assert list(dataset.users.raw_ids) == ["3", "7", "20", "100"]
    assert split.user_start.tolist() == [0, 25, 30, 45, 80]
    # `order` is a permutation of the input rows, and the ordered arrays are gathered through it.
    assert sorted(split.order.tolist()) == list(range(80))
    assert np.array_equal(split.user, inter.user[split.order])
    assert np.array_equal(split.item, inter.item[split.order])
    assert np.array_equal(split.timestamp, inter.timestamp[split.order])
    # Row counts per fold: train 21 + 3 + 11 + 27, valid 2 + 1 + 2 + 4, test the same.
    assert len(split.rows(TRAIN)) == 62
    assert len(split.rows(VALID)) == 9
    assert len(split.rows(TEST)) == 9
    assert len(split.rows(VALID, TEST)) == 18
    # User "7"'s rows are positions 25..29 in protocol order: train, train, train, valid, test.
    assert split.fold[25:30].tolist() == [TRAIN, TRAIN, TRAIN, VALID, TEST]


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [TEST]),  # the one row is test; nothing is left for valid or train
        (2, [VALID, TEST]),
        (3, [TRAIN, VALID, TEST]),
    ],
)
def test_users_with_very_few_interactions(n, expected):
    dataset = build_dataset("few", ratings_frame([("1", str(j), j) for j in range(1, n + 1)]))
    assert protocol_split(dataset).fold.tolist() == expected


def test_fingerprint_changes_with_the_folds(hand):
    dataset, split = hand
    assert protocol_split(dataset).fingerprint() == split.fingerprint()
    # Move user "7"'s last interaction earlier: the order changes, so the fingerprint must.
    user_7 = [("7", "10", 300), ("7", "9", 300), ("7", "2", 100), ("7", "7", 200), ("7", "1", 50)]
    other = build_dataset("hand", ratings_frame(paired_rows("3", 25) + user_7))
    assert protocol_split(other).fingerprint() != split.fingerprint()


# --- the real MovieLens-100K --------------------------------------------------------------------


def reference_split(inter_path: Path) -> dict[tuple[str, str], str]:
    """PROTOCOL.md in plain Python over the raw rows: {(user_id, item_id): fold name}."""
    by_user: dict[str, list[tuple[int, int]]] = defaultdict(list)
    with open(inter_path, encoding="utf-8") as f:
        next(f)  # RecBole header: user_id:token item_id:token rating:float timestamp:float
        for line in f:
            user, item, _rating, timestamp = line.rstrip("\n").split("\t")
            by_user[user].append((int(float(timestamp)), int(item)))
    folds = {}
    for user, rows in by_user.items():
        rows.sort()
        n = len(rows)
        n_test = n_valid = max(1, round(0.1 * n))
        for position, (_, item) in enumerate(rows):
            if position >= n - n_test:
                folds[(user, str(item))] = "test"
            elif position >= n - n_test - n_valid:
                folds[(user, str(item))] = "valid"
            else:
                folds[(user, str(item))] = "train"
    return folds


@pytest.fixture(scope="module")
def ml100k_split(ml100k):
    return protocol_split(ml100k)


def test_ml100k_matches_plain_python_reference(ml100k, ml100k_split, shared_data_dir):
    reference = reference_split(shared_data_dir / "ml-100k" / "ml-100k.inter")
    # ML-100K has no repeated (user, item) pair, so the pair names the row.
    assert len(reference) == 100_000
    split = ml100k_split
    got = {
        (str(ml100k.users.raw_ids[u]), str(ml100k.items.raw_ids[i])): FOLD_NAME[int(f)]
        for u, i, f in zip(split.user, split.item, split.fold, strict=True)
    }
    assert got == reference
    # Totals of the reference: 943 users, sum over users of n - 2k, k, k with k = max(1, round(0.1 n)).
    counts = {name: sum(1 for f in reference.values() if f == name) for name in ("train", "valid", "test")}
    assert counts == {"train": 80_024, "valid": 9_988, "test": 9_988}
    assert (len(split.rows(TRAIN)), len(split.rows(VALID)), len(split.rows(TEST))) == (80_024, 9_988, 9_988)


def test_ml100k_every_user_has_valid_and_test(ml100k, ml100k_split):
    split = ml100k_split
    assert ml100k.n_users == 943
    for fold in (VALID, TEST):
        assert np.bincount(split.user[split.fold == fold], minlength=943).min() >= 1
    # Every ML-100K user has >= 20 ratings, so >= 2 each in valid and test, > 0 in train.
    assert np.bincount(split.user[split.fold == TRAIN], minlength=943).min() >= 16


def test_ml100k_folds_are_time_ordered_per_user(ml100k_split):
    split = ml100k_split
    same_user = split.user[1:] == split.user[:-1]
    # Within a user: timestamps never decrease, ties ordered by item, folds go train -> valid -> test.
    dt = np.diff(split.timestamp)
    assert (dt[same_user] >= 0).all()
    tie = same_user & (dt == 0)
    assert (split.item[1:][tie] > split.item[:-1][tie]).all()
    assert (np.diff(split.fold.astype(np.int64))[same_user] >= 0).all()
    # Users are contiguous and in index order.
    assert (np.diff(split.user) >= 0).all()


def test_ml100k_no_row_in_two_folds(ml100k, ml100k_split):
    split = ml100k_split
    # Each input row appears exactly once in protocol order, with exactly one fold.
    assert np.array_equal(np.sort(split.order), np.arange(len(ml100k.interactions)))
    assert set(np.unique(split.fold).tolist()) == {TRAIN, VALID, TEST}
    pairs = split.user.astype(np.int64) * (ml100k.n_items + 1) + split.item
    assert len(np.unique(pairs)) == 100_000
    per_fold = [set(pairs[split.fold == f].tolist()) for f in (TRAIN, VALID, TEST)]
    assert sum(len(s) for s in per_fold) == 100_000
    train, valid, test = per_fold
    assert not (train & valid) and not (train & test) and not (valid & test)
