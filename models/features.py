"""Features shared by training, evaluation and serving.

Models speak *codes*: `code = index + 1` for users and items, with 0 meaning
"unknown user" / "no item" (history padding). Side features of the catalogue
live inside the models as buffers, so a served model needs only codes, the
user's side features and the history.

User side features, one small vocabulary each (0 = unknown):
    age bucket, gender, occupation, zip prefix (first two characters).
Item side features: genre multi-hot, release-year bucket.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from models.data import Dataset

AGE_EDGES = (18, 25, 35, 45, 50, 56)  # MovieLens-1M's own age groups
YEAR_EDGES = tuple(range(1930, 2031, 5))
USER_FEATURES = ("age", "gender", "occupation", "zip_prefix")


@dataclass
class FeatureSpace:
    """Vocabularies of the side features; JSON-serialisable, saved in every artifact."""

    n_users: int
    n_items: int
    history_len: int = 50
    genders: list[str] = field(default_factory=list)
    occupations: list[str] = field(default_factory=list)
    zip_prefixes: list[str] = field(default_factory=list)
    genres: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.history_len < 1:
            raise ValueError(f"history_len must be >= 1, got {self.history_len}")

    @property
    def user_vocab_sizes(self) -> tuple[int, int, int, int]:
        """Embedding table sizes for USER_FEATURES (each + 1 for unknown)."""
        return (len(AGE_EDGES) + 2, len(self.genders) + 1, len(self.occupations) + 1, len(self.zip_prefixes) + 1)

    @property
    def n_year_buckets(self) -> int:
        return len(YEAR_EDGES) + 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpace:
        return cls(**d)

    def encode_user_features(
        self, age: np.ndarray, gender: np.ndarray, occupation: np.ndarray, zip_code: np.ndarray
    ) -> np.ndarray:
        """int64 [n, 4] codes; unknown or unseen values map to 0."""
        return np.stack(
            [
                age_bucket(np.asarray(age)),
                _lookup(self.genders, gender),
                _lookup(self.occupations, occupation),
                _lookup(self.zip_prefixes, zip_prefix(np.asarray(zip_code, dtype=object))),
            ],
            axis=1,
        ).astype(np.int64)


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


def age_bucket(age: np.ndarray) -> np.ndarray:
    age = np.asarray(age, dtype=np.int64)
    return np.where(age < 0, 0, np.searchsorted(AGE_EDGES, age, side="right") + 1)


def year_bucket(year: np.ndarray) -> np.ndarray:
    year = np.asarray(year, dtype=np.int64)
    return np.where(year < 0, 0, np.searchsorted(YEAR_EDGES, year, side="right") + 1)


def zip_prefix(zip_code: np.ndarray) -> np.ndarray:
    return np.array([str(z)[:2] if z else "" for z in zip_code], dtype=object)


def histories_before(
    item_codes: np.ndarray, user_start: np.ndarray, positions: np.ndarray, history_len: int
) -> np.ndarray:
    """The last `history_len` item codes before each position, within the same user.

    Args:
        item_codes: int [n] item codes in protocol order (users contiguous).
        user_start: int [b] start position of the user of each requested position.
        positions: int [b] rows whose history we want (the history excludes the row itself).
    Returns:
        int64 [b, history_len], right-aligned (most recent last), 0-padded on the left.
    """
    offsets = np.arange(history_len, 0, -1)
    idx = positions[:, None] - offsets[None, :]
    valid = idx >= user_start[:, None]
    return np.where(valid, item_codes[np.maximum(idx, 0)], 0).astype(np.int64)


def _vocab(values: np.ndarray) -> list[str]:
    return sorted({str(v) for v in values if v})


def _lookup(vocab: list[str], values: np.ndarray) -> np.ndarray:
    index = {v: j + 1 for j, v in enumerate(vocab)}
    return np.array([index.get(str(v), 0) for v in values], dtype=np.int64)
