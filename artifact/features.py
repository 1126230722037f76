"""Side features as models see them: vocabularies and codes, shared by training and serving.

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
        return (
            len(AGE_EDGES) + 2,
            len(self.genders) + 1,
            len(self.occupations) + 1,
            len(self.zip_prefixes) + 1,
        )

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


def age_bucket(age: np.ndarray) -> np.ndarray:
    age = np.asarray(age, dtype=np.int64)
    return np.where(age < 0, 0, np.searchsorted(AGE_EDGES, age, side="right") + 1)


def year_bucket(year: np.ndarray) -> np.ndarray:
    year = np.asarray(year, dtype=np.int64)
    return np.where(year < 0, 0, np.searchsorted(YEAR_EDGES, year, side="right") + 1)


def zip_prefix(zip_code: np.ndarray) -> np.ndarray:
    return np.array([str(z)[:2] if z else "" for z in zip_code], dtype=object)


def _lookup(vocab: list[str], values: np.ndarray) -> np.ndarray:
    index = {v: j + 1 for j, v in enumerate(vocab)}
    return np.array([index.get(str(v), 0) for v in values], dtype=np.int64)
