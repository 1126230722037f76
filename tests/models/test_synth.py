"""Synthetic data: table shapes, invariants, determinism, round trip, and learnable structure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from slimrec.models.data import ITEM_COLUMNS, RATING_COLUMNS, USER_COLUMNS, build_dataset
from slimrec.models.movielens import load_dataset
from slimrec.models.synth import GENRES, MIN_PER_USER, generate_synthetic, simulate, write_synthetic

SHAPE = dict(n_items=2000, n_users=300, n_interactions=20_000)


@pytest.fixture(scope="module")
def tables():
    return generate_synthetic(**SHAPE, seed=0)


@pytest.fixture(scope="module")
def world():
    return simulate(**SHAPE, seed=0)


def test_shapes_and_columns(tables):
    ratings, users, items = tables
    assert list(ratings.columns) == RATING_COLUMNS
    assert list(users.columns) == USER_COLUMNS
    assert list(items.columns) == ITEM_COLUMNS
    assert (len(ratings), len(users), len(items)) == (20_000, 300, 2000)
    assert ratings["rating"].dtype == np.float32 and ratings["timestamp"].dtype == np.int64
    assert set(ratings["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert set(ratings["user_id"]) <= set(users["user_id"])
    assert set(ratings["item_id"]) <= set(items["item_id"])


def test_no_repeated_pairs(tables):
    ratings, _, _ = tables
    assert not ratings.duplicated(["user_id", "item_id"]).any()


def test_every_user_has_enough_history_in_time_order(tables):
    ratings, _, _ = tables
    assert ratings.groupby("user_id").size().min() >= MIN_PER_USER
    same_user = ratings["user_id"].to_numpy()[1:] == ratings["user_id"].to_numpy()[:-1]
    assert (np.diff(ratings["timestamp"].to_numpy())[same_user] > 0).all()


def test_deterministic_per_seed(tables):
    again = generate_synthetic(**SHAPE, seed=0)
    for a, b in zip(tables, again, strict=True):
        pd.testing.assert_frame_equal(a, b)
    other = generate_synthetic(**SHAPE, seed=1)
    assert not tables[0].equals(other[0])


def test_popularity_is_skewed(tables):
    counts = tables[0]["item_id"].value_counts().to_numpy()
    top_tenth = counts[: SHAPE["n_items"] // 10].sum() / counts.sum()
    assert top_tenth > 0.25  # uniform popularity would give 0.10


def test_side_features_are_plausible(tables):
    _, users, items = tables
    assert users["age"].between(7, 80).all()
    assert set(users["gender"]) <= {"M", "F"}
    assert users["zip_code"].str.fullmatch(r"\d{5}").all()
    genres = items["genres"].str.split("|")
    assert genres.map(len).between(1, 3).all()
    assert set(genres.explode()) <= set(GENRES)
    assert items["year"].between(1920, 2023).all()


def test_round_trip_through_atomic_files(tmp_path, tables):
    out = write_synthetic(tmp_path / "synth", **SHAPE, seed=0)
    loaded = load_dataset(out)
    assert loaded.name == "synth"
    assert (loaded.n_users, loaded.n_items, len(loaded.interactions)) == (300, 2000, 20_000)
    direct = build_dataset("synth", *tables)
    assert loaded.fingerprint() == direct.fingerprint()
    np.testing.assert_array_equal(loaded.interactions.rating, direct.interactions.rating)
    np.testing.assert_array_equal(loaded.items.genres, direct.items.genres)
    np.testing.assert_array_equal(loaded.items.year, direct.items.year)
    np.testing.assert_array_equal(loaded.users.zip_code, direct.users.zip_code)


def test_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="n_interactions"):
        simulate(n_items=100, n_users=50, n_interactions=100)  # fewer than 5 per user


# --- learnable structure -----------------------------------------------------------------


def _histories(world, min_length=12):
    """(user's rows) for users with enough history, rows in time order."""
    starts = np.flatnonzero(np.r_[True, world.user[1:] != world.user[:-1]])
    ends = np.r_[starts[1:], len(world.user)]
    return [np.arange(a, b) for a, b in zip(starts, ends, strict=True) if b - a >= min_length]


def test_next_item_follows_recent_interests(world):
    cluster = world.item_cluster[world.item]
    share = np.bincount(cluster, minlength=world.item_cluster.max() + 1) / len(cluster)
    recent_hits = early_hits = chance = 0.0
    histories = _histories(world)
    for rows in histories:
        nxt, recent, early = rows[-1], set(cluster[rows[-6:-1]]), set(cluster[rows[:5]])
        recent_hits += cluster[nxt] in recent
        early_hits += cluster[nxt] in early
        chance += share[list(recent)].sum()  # a popularity-weighted random item
    recent_hits, early_hits, chance = (x / len(histories) for x in (recent_hits, early_hits, chance))
    assert recent_hits > 0.7
    assert recent_hits > 2.5 * chance
    assert recent_hits > early_hits + 0.2  # interests drift: recent history predicts better


def test_genres_follow_recent_history(world):
    genres = world.item_genres[world.item]
    histories = _histories(world)
    rng = np.random.default_rng(0)
    shared = chance = 0.0
    for rows in histories:
        recent = np.bitwise_or.reduce(genres[rows[-6:-1]])
        shared += bool(genres[rows[-1]] & recent)
        chance += np.mean((genres[rng.integers(0, len(genres), 50)] & recent) > 0)
    assert shared / len(histories) > chance / len(histories) + 0.15


def test_ratings_rise_with_affinity(world):
    inside = (world.user_interests[world.user] == world.item_cluster[world.item][:, None]).any(axis=1)
    assert world.rating[inside].mean() > world.rating[~inside].mean() + 1.0
