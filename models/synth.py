"""Synthetic interaction data with structure a recommender can learn, at any scale.

The generative story, all vectorised numpy (10M interactions take seconds, not hours):
  - Items fall into latent interest clusters of Zipf-distributed sizes; item popularity is
    Zipf over a random global rank, so it is Zipf within and across clusters.
  - Each user holds a sparse mixture over 1-3 clusters whose weights drift along the user's
    history (early interests fade, later ones rise), so recent history predicts the next item;
    a few interactions are exploration outside the mixture.
  - Activity is heavy-tailed (lognormal), at least `MIN_PER_USER` interactions per user,
    timestamps strictly increasing per user; no (user, item) pair repeats.
  - Side features follow the clusters: item genres from a per-cluster genre distribution and
    release years around a per-cluster era; user age/gender/occupation/zip from the user's
    main cluster. Ratings 1-5 rise with the user's current affinity for the item's cluster.

Tables come out in `models.data`'s formats; `write_synthetic` writes RecBole atomic files
that `models.movielens.load_dataset` reads back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
OCCUPATIONS = [
    "administrator",
    "artist",
    "doctor",
    "educator",
    "engineer",
    "entertainment",
    "executive",
    "healthcare",
    "homemaker",
    "lawyer",
    "librarian",
    "marketing",
    "none",
    "other",
    "programmer",
    "retired",
    "salesman",
    "scientist",
    "student",
    "technician",
    "writer",
]
MIN_PER_USER = 5
POPULARITY_EXPONENT, POPULARITY_OFFSET = 0.9, 1.0  # Zipf over a random global item rank
MAX_INTERESTS = 3
EXPLORE_RATE = 0.08  # share of interactions drawn outside the user's interests
POPULARITY_ROUNDS = 20  # repeat draws by popularity = sampling without replacement
DRIFT_WIDTH = 0.3  # how long (as a share of a user's history) one interest dominates
TIME_START, TIME_END = 946_684_800, 1_704_067_200  # 2000-01-01 .. 2024-01-01 UTC


@dataclass(frozen=True)
class SyntheticWorld:
    """Everything drawn, as numeric arrays; interactions grouped by user in time order."""

    user: np.ndarray  # int32 [n] user index
    item: np.ndarray  # int32 [n] item index
    rating: np.ndarray  # int8 [n] 1..5
    timestamp: np.ndarray  # int64 [n]
    item_cluster: np.ndarray  # int32 [n_items]
    item_genres: np.ndarray  # int32 [n_items] bit g set = GENRES[g]
    item_year: np.ndarray  # int32 [n_items]
    user_interests: np.ndarray  # int32 [n_users, MAX_INTERESTS] clusters, -1 unused
    user_age: np.ndarray  # int32 [n_users]
    user_gender: np.ndarray  # <U1 [n_users] "M"/"F"
    user_occupation: np.ndarray  # int8 [n_users] index into OCCUPATIONS
    user_zip: np.ndarray  # int32 [n_users] 5-digit zip as a number


def default_clusters(n_items: int) -> int:
    return int(np.clip(round(np.sqrt(n_items) / 4), 4, 512))


def simulate(
    n_items: int, n_users: int, n_interactions: int, seed: int = 0, n_clusters: int | None = None
) -> SyntheticWorld:
    """Draw a world; the same arguments always give the same arrays."""
    n_clusters = min(n_clusters or default_clusters(n_items), n_items)
    cap = max(MIN_PER_USER, n_items // 2)  # room left for duplicate-free resampling
    if not MIN_PER_USER * n_users <= n_interactions <= cap * n_users:
        raise ValueError(
            f"n_interactions must lie in [{MIN_PER_USER * n_users}, {cap * n_users}] "
            f"for {n_users} users and {n_items} items"
        )
    rng = np.random.default_rng(seed)
    item_cluster = _cluster_assignment(rng, n_items, n_clusters)
    popularity = 1.0 / (rng.permutation(n_items) + POPULARITY_OFFSET) ** POPULARITY_EXPONENT
    catalog = _ClusterCatalog(item_cluster, popularity, n_clusters)

    counts = _activity(rng, n_users, n_interactions, cap)
    user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    starts = np.cumsum(counts) - counts
    position = np.arange(len(user)) - np.repeat(starts, counts)
    progress = (position / np.repeat(counts, counts)).astype(np.float32)  # 0..1 through each history

    interests, strength = _interests(rng, n_users, catalog.weight)
    mixture = _drifting_mixture(interests, strength, user, progress)  # [n, MAX_INTERESTS]
    cumulative = np.cumsum(mixture, axis=1)
    slot = (rng.random(len(user), dtype=np.float32)[:, None] > cumulative).sum(axis=1)
    n_active = (interests >= 0).sum(axis=1)
    cluster = interests[user, np.minimum(slot, n_active[user] - 1)]  # rounding never picks an unused slot
    explore = rng.random(len(user)) < EXPLORE_RATE
    cluster[explore] = rng.choice(n_clusters, int(explore.sum()), p=catalog.weight)
    item = catalog.by_popularity(rng, cluster)
    _remove_repeats(rng, user, item, cluster, catalog, starts, counts)

    # Affinity: the weight the user's current mixture gives the item's cluster.
    affinity = (mixture * (interests[user] == item_cluster[item][:, None])).sum(axis=1)
    quality = rng.normal(0.0, 0.4, n_items).astype(np.float32)
    leniency = rng.normal(0.0, 0.4, n_users).astype(np.float32)
    score = 2.4 + 2.2 * affinity + quality[item] + leniency[user] + rng.normal(0, 0.6, len(user))
    rating = np.clip(np.rint(score), 1, 5).astype(np.int8)

    main = interests[np.arange(n_users), np.argmax(strength, axis=1)]
    return SyntheticWorld(
        user=user,
        item=item,
        rating=rating,
        timestamp=_timestamps(rng, counts, starts, user),
        item_cluster=item_cluster,
        **_item_features(rng, item_cluster, n_clusters),
        user_interests=interests,
        **_user_features(rng, main, n_clusters),
    )


class _ClusterCatalog:
    """Items sorted by cluster with cumulative popularity, for sampling items given a cluster."""

    def __init__(self, item_cluster: np.ndarray, popularity: np.ndarray, n_clusters: int):
        self.order = np.argsort(item_cluster, kind="stable").astype(np.int32)
        bounds = np.searchsorted(item_cluster[self.order], np.arange(n_clusters + 1))
        self.first, self.end = bounds[:-1], bounds[1:]
        self.cumulative = np.cumsum(popularity[self.order])
        before = np.concatenate([[0.0], self.cumulative])
        self.offset = before[self.first]
        self.total = before[self.end] - self.offset
        self.weight = self.total / self.total.sum()

    def by_popularity(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        target = self.offset[cluster] + rng.random(len(cluster)) * self.total[cluster]
        position = np.searchsorted(self.cumulative, target, side="right")
        return self.order[np.clip(position, self.first[cluster], self.end[cluster] - 1)]

    def uniformly(self, rng: np.random.Generator, cluster: np.ndarray) -> np.ndarray:
        size = self.end[cluster] - self.first[cluster]
        return self.order[self.first[cluster] + (rng.random(len(cluster)) * size).astype(np.int64)]


def _cluster_assignment(rng, n_items: int, n_clusters: int) -> np.ndarray:
    sizes = 1.0 / (np.arange(n_clusters) + 1.0) ** 0.6
    cluster = rng.choice(n_clusters, n_items, p=sizes / sizes.sum()).astype(np.int32)
    cluster[rng.permutation(n_items)[:n_clusters]] = np.arange(n_clusters)  # none empty
    return cluster


def _activity(rng, n_users: int, n_interactions: int, cap: int) -> np.ndarray:
    """Heavy-tailed interactions per user, each in [MIN_PER_USER, cap], summing exactly."""
    weight = rng.lognormal(0.0, 1.1, n_users)
    counts = np.full(n_users, MIN_PER_USER, dtype=np.int64)
    while (left := n_interactions - counts.sum()) > 0:
        room = cap - counts
        share = np.where(room > 0, weight, 0.0)
        extra = np.floor(left * share / share.sum()).astype(np.int64)
        if extra.sum() == 0:  # hand out the remainder one by one
            extra[rng.choice(n_users, int(left), replace=False, p=share / share.sum())] = 1
        counts += np.minimum(extra, room)
    return counts


def _interests(rng, n_users: int, cluster_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-3 distinct clusters per user (popular clusters more often) and their strengths."""
    k = min(MAX_INTERESTS, len(cluster_weight))
    interests = rng.choice(len(cluster_weight), (n_users, MAX_INTERESTS), p=cluster_weight).astype(np.int32)
    active = np.arange(MAX_INTERESTS) < rng.integers(1, k + 1, n_users)[:, None]
    for _ in range(1000):
        clash = np.zeros(n_users, dtype=bool)
        for a in range(MAX_INTERESTS):
            for b in range(a + 1, MAX_INTERESTS):
                clash |= active[:, b] & (interests[:, a] == interests[:, b])
        if not clash.any():
            break
        shape = (int(clash.sum()), MAX_INTERESTS)
        interests[clash] = rng.choice(len(cluster_weight), shape, p=cluster_weight)
    interests[~active] = -1
    strength = rng.dirichlet(np.ones(MAX_INTERESTS), n_users).astype(np.float32) * active
    return interests, strength / strength.sum(axis=1, keepdims=True)


def _drifting_mixture(interests, strength, user, progress) -> np.ndarray:
    """Per interaction, weights over the user's interests: interest j peaks at its own point of
    the history ((j + 0.5) / k for a user with k interests)."""
    k = (interests >= 0).sum(axis=1).astype(np.float32)
    centre = (np.arange(MAX_INTERESTS, dtype=np.float32) + 0.5) / k[:, None]
    mixture = strength[user] * np.exp(-(((progress[:, None] - centre[user]) / DRIFT_WIDTH) ** 2))
    return mixture / mixture.sum(axis=1, keepdims=True)


def _remove_repeats(rng, user, item, cluster, catalog: _ClusterCatalog, starts, counts) -> None:
    """Redraw repeated (user, item) pairs in place, keeping each pair's first occurrence:
    from the same cluster by popularity, then uniformly in it, then from the whole catalogue."""
    rows = np.arange(len(user))
    for attempt in range(10_000):
        key = user[rows].astype(np.int64) * len(catalog.order) + item[rows]
        order = np.argsort(key, kind="stable")
        repeat = rows[order[1:][key[order[1:]] == key[order[:-1]]]]
        if len(repeat) == 0:
            return
        if attempt < POPULARITY_ROUNDS:
            item[repeat] = catalog.by_popularity(rng, cluster[repeat])
        elif attempt < POPULARITY_ROUNDS + 10:
            item[repeat] = catalog.uniformly(rng, cluster[repeat])
        else:
            item[repeat] = rng.integers(0, len(catalog.order), len(repeat))
        rows = _rows_of(np.unique(user[repeat]), starts, counts)  # only they can have new repeats
    raise RuntimeError("could not draw distinct items per user")


def _rows_of(users: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Interaction rows of the given users (rows are grouped by user)."""
    length = counts[users]
    return np.arange(length.sum()) + np.repeat(starts[users] - (np.cumsum(length) - length), length)


def _timestamps(rng, counts: np.ndarray, starts: np.ndarray, user: np.ndarray) -> np.ndarray:
    """Strictly increasing per user: bursts of activity separated by breaks, each user active
    over a span between a week and four years, somewhere between TIME_START and TIME_END."""
    span = np.exp(rng.uniform(np.log(7 * 86_400), np.log(4 * 365 * 86_400), len(counts)))
    raw = rng.exponential(1.0, len(user)) * np.where(rng.random(len(user)) < 0.15, 200.0, 1.0)
    total = np.add.reduceat(raw, starts)
    gap = (raw * (span / total)[user]).astype(np.int64) + 1
    elapsed = np.cumsum(gap)
    elapsed -= np.repeat(elapsed[starts] - gap[starts], counts)
    last = elapsed[starts + counts - 1]
    slack = np.maximum(TIME_END - TIME_START - last, 0)
    begin = TIME_START + (rng.random(len(counts)) * slack).astype(np.int64)
    return begin[user] + elapsed


def _item_features(rng, item_cluster: np.ndarray, n_clusters: int) -> dict:
    genre_p = rng.dirichlet(np.full(len(GENRES), 0.3), n_clusters).astype(np.float32)
    # Gumbel top-k: 1-3 distinct genres per item, drawn from its cluster's distribution.
    noise = rng.gumbel(size=(len(item_cluster), len(GENRES))).astype(np.float32)
    keys = np.log(genre_p[item_cluster] + 1e-9) + noise
    ranked = np.argsort(-keys, axis=1)[:, :3]
    n_genres = rng.choice(3, len(item_cluster), p=[0.5, 0.35, 0.15]) + 1
    chosen = np.arange(3) < n_genres[:, None]
    genres = ((1 << ranked) * chosen).sum(axis=1).astype(np.int32)
    era = rng.uniform(1950, 2020, n_clusters)
    year = np.clip(np.rint(era[item_cluster] + rng.normal(0, 8, len(item_cluster))), 1920, 2023)
    return {"item_genres": genres, "item_year": year.astype(np.int32)}


def _user_features(rng, main_cluster: np.ndarray, n_clusters: int) -> dict:
    n = len(main_cluster)
    age = np.clip(np.rint(rng.uniform(20, 50, n_clusters)[main_cluster] + rng.normal(0, 8, n)), 7, 80)
    male = rng.random(n) < rng.uniform(0.2, 0.8, n_clusters)[main_cluster]
    occupation_p = np.cumsum(rng.dirichlet(np.full(len(OCCUPATIONS), 0.5), n_clusters), axis=1)
    occupation = (rng.random(n)[:, None] > occupation_p[main_cluster]).sum(axis=1)
    region = rng.integers(10, 1000, n_clusters)
    return {
        "user_age": age.astype(np.int32),
        "user_gender": np.where(male, "M", "F"),
        "user_occupation": np.minimum(occupation, len(OCCUPATIONS) - 1).astype(np.int8),
        "user_zip": (region[main_cluster] * 100 + rng.integers(0, 100, n)).astype(np.int32),
    }


# --- tables and files --------------------------------------------------------------------


def generate_synthetic(
    n_items: int, n_users: int, n_interactions: int, seed: int = 0, n_clusters: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(ratings, users, items) in `models.data`'s table formats; raw ids are "1", "2", ..."""
    world = simulate(n_items, n_users, n_interactions, seed, n_clusters)
    ratings = pd.DataFrame(
        {
            "user_id": _ids(world.user),
            "item_id": _ids(world.item),
            "rating": world.rating.astype(np.float32),
            "timestamp": world.timestamp,
        }
    )
    users, items = _metadata(world, genre_sep="|")
    return ratings, users, items


def write_synthetic(
    out_dir: str | Path,
    n_items: int,
    n_users: int,
    n_interactions: int,
    seed: int = 0,
    n_clusters: int | None = None,
    name: str = "synth",
) -> Path:
    """Write `<name>.inter/.user/.item` (RecBole atomic files) into `out_dir`; returns it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = simulate(n_items, n_users, n_interactions, seed, n_clusters)
    # Numbers go straight to text: no 10M-row column of Python strings.
    ratings = pd.DataFrame(
        {
            "user_id": world.user + 1,
            "item_id": world.item + 1,
            "rating": world.rating,
            "timestamp": world.timestamp,
        }
    )
    users, items = _metadata(world, genre_sep=" ")
    items = items.rename(columns={"title": "movie_title", "year": "release_year", "genres": "class"})
    items = items[["item_id", "movie_title", "release_year", "class"]]
    _write_atomic(out / f"{name}.inter", ratings, ["token", "token", "float", "float"])
    _write_atomic(out / f"{name}.user", users, ["token"] * 5)
    _write_atomic(out / f"{name}.item", items, ["token", "token_seq", "token", "token_seq"])
    return out


def _ids(index: np.ndarray) -> pd.Series:
    return pd.Series(index.astype(np.int64) + 1).astype(str)


def _metadata(world: SyntheticWorld, genre_sep: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    n_users, n_items = len(world.user_age), len(world.item_cluster)
    users = pd.DataFrame(
        {
            "user_id": _ids(np.arange(n_users)),
            "age": world.user_age,
            "gender": world.user_gender.astype(object),
            "occupation": np.asarray(OCCUPATIONS, dtype=object)[world.user_occupation],
            "zip_code": pd.Series(world.user_zip).astype(str).str.zfill(5),
        }
    )
    # Few distinct genre sets: spell each once, then index.
    masks, inverse = np.unique(world.item_genres, return_inverse=True)
    spelled = np.array(
        [genre_sep.join(g for b, g in enumerate(GENRES) if m >> b & 1) for m in masks], dtype=object
    )
    item_ids = _ids(np.arange(n_items))
    items = pd.DataFrame(
        {
            "item_id": item_ids,
            "title": "Item " + item_ids,
            "genres": spelled[inverse.reshape(-1)],
            "year": world.item_year,
        }
    )
    return users, items


def _write_atomic(path: Path, table: pd.DataFrame, types: list[str]) -> None:
    header = "\t".join(f"{column}:{kind}" for column, kind in zip(table.columns, types, strict=True))
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(header + "\n")
        table.to_csv(f, sep="\t", header=False, index=False, chunksize=1_000_000, lineterminator="\n")
