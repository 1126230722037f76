"""Feature tables of a dataset: its vocabularies (a `FeatureSpace`) and the per-user and per-item codes."""

from __future__ import annotations

import numpy as np
from slimrec.artifact.features import FeatureSpace, year_bucket, zip_prefix
from slimrec.models.data import Dataset


def build_feature_space(dataset: Dataset, history_len: int = 50) -> FeatureSpace:
    users, items = dataset.users, dataset.items
    genres = sorted({g for gs in items.genres for g in gs.split("|") if g})
    return FeatureSpace(
        n_users=dataset.n_users,
        n_items=dataset.n_items,
        history_len=history_len,
        genders=_vocab(users.gender),
        occupations=_vocab(users.occupation),
        zip_prefixes=_vocab(zip_prefix(users.zip_code)),
        genres=genres,
    )


def user_feature_table(space: FeatureSpace, dataset: Dataset) -> np.ndarray:
    """int64 [n_users + 1, 4]: row = user code (row 0, unknown user, is all zeros)."""
    u = dataset.users
    table = space.encode_user_features(u.age, u.gender, u.occupation, u.zip_code)
    return np.vstack([np.zeros((1, 4), np.int64), table])


def item_genre_table(space: FeatureSpace, dataset: Dataset) -> np.ndarray:
    """uint8 [n_items + 1, n_genres] multi-hot; row = item code."""
    index = {g: j for j, g in enumerate(space.genres)}
    table = np.zeros((dataset.n_items + 1, max(1, len(space.genres))), np.uint8)
    for i, gs in enumerate(dataset.items.genres):
        for g in gs.split("|"):
            if g in index:
                table[i + 1, index[g]] = 1
    return table


def item_year_table(dataset: Dataset) -> np.ndarray:
    """int64 [n_items + 1] year bucket; row = item code."""
    return np.concatenate([[0], year_bucket(dataset.items.year)]).astype(np.int64)


def _vocab(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values if v})
