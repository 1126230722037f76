"""A fold of the protocol: which rows a model is fitted on and which fold it is scored on.

PROTOCOL.md: fit on train and score validation (model selection), then refit on
train + validation and score test (the reported figures). `Fold` holds everything
both training and evaluation need for one of those two settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.user_state import UserInputs, gather_ranges, user_inputs
from slimrec.models.csr import csr_from_pairs
from slimrec.models.data import Dataset
from slimrec.models.features import item_genre_table, item_year_table, user_feature_table
from slimrec.models.split import TEST, TRAIN, VALID, Split

FIT_TRAIN = "train"  # fit on train, score valid
FIT_TRAIN_VALID = "train+valid"  # fit on train + valid, score test


@dataclass
class Fold:
    name: str  # FIT_TRAIN or FIT_TRAIN_VALID
    dataset: Dataset
    split: Split
    space: FeatureSpace
    fit_folds: tuple[int, ...]
    eval_fold: int

    @classmethod
    def create(cls, name: str, dataset: Dataset, split: Split, space: FeatureSpace) -> Fold:
        if name == FIT_TRAIN:
            return cls(name, dataset, split, space, (TRAIN,), VALID)
        if name == FIT_TRAIN_VALID:
            return cls(name, dataset, split, space, (TRAIN, VALID), TEST)
        raise ValueError(f"unknown fold {name!r}; expected {FIT_TRAIN!r} or {FIT_TRAIN_VALID!r}")

    @property
    def eval_name(self) -> str:
        return {VALID: "valid", TEST: "test"}[self.eval_fold]

    # --- rows ---------------------------------------------------------------------------

    @cached_property
    def fit_positions(self) -> np.ndarray:
        """Positions (protocol order) of the rows the model is fitted on."""
        return self.split.rows(*self.fit_folds)

    @cached_property
    def item_codes(self) -> np.ndarray:
        """Item code of every row in protocol order."""
        return self.split.item.astype(np.int64) + 1

    @cached_property
    def fit_counts(self) -> np.ndarray:
        """Number of fitted rows per user (a prefix of each user's sequence)."""
        return np.bincount(self.split.user[self.fit_positions], minlength=self.dataset.n_users)

    # --- tables the models carry as buffers -------------------------------------------------

    @cached_property
    def tables(self) -> dict[str, torch.Tensor]:
        """user_rows / item_rows map codes to id-embedding rows; ids never fitted share row 0."""
        fitted_items = np.bincount(self.split.item[self.fit_positions], minlength=self.dataset.n_items) > 0
        fitted_users = self.fit_counts > 0
        item_rows = np.concatenate([[0], np.where(fitted_items, np.arange(1, self.dataset.n_items + 1), 0)])
        user_rows = np.concatenate([[0], np.where(fitted_users, np.arange(1, self.dataset.n_users + 1), 0)])
        return {
            "user_rows": torch.from_numpy(user_rows),
            "item_rows": torch.from_numpy(item_rows),
            "item_genres": torch.from_numpy(item_genre_table(self.space, self.dataset)),
            "item_year": torch.from_numpy(item_year_table(self.dataset)),
        }

    @cached_property
    def user_features(self) -> np.ndarray:
        """int64 [n_users + 1, 4] by user code."""
        return user_feature_table(self.space, self.dataset)

    @cached_property
    def item_popularity(self) -> np.ndarray:
        """Fitted interactions per item index (the popularity fallback and the logQ correction)."""
        return np.bincount(self.split.item[self.fit_positions], minlength=self.dataset.n_items)

    # --- the evaluation setting -------------------------------------------------------------

    @cached_property
    def eval_users(self) -> np.ndarray:
        """User indices with at least one row in the scored fold."""
        return np.unique(self.split.user[self.split.fold == self.eval_fold])

    def inputs_before(self, users: np.ndarray, ends: np.ndarray) -> UserInputs:
        """Model inputs of users [b] with their histories cut before protocol positions `ends` [b].

        Returns:
            UserInputs: codes int64 [b], features int64 [b, 4], history int64 [b, N]
            (slimrec.artifact.user_state, which serving calls too).
        """
        return user_inputs(
            users,
            self.user_features,
            self.split.item,
            self.split.user_start[users],
            ends,
            self.space.history_len,
        )

    def fitted_end(self, users: np.ndarray) -> np.ndarray:
        """int64 [b]: the protocol position just past each user's fitted rows (a prefix of theirs)."""
        return self.split.user_start[users] + self.fit_counts[users]

    def user_state(self, users: np.ndarray) -> UserInputs:
        """(codes [b], features [b, 4], history [b, N]) as of the end of the fitted rows: what a
        served model's `known_users` feeds for the same users."""
        return self.inputs_before(users, self.fitted_end(users))

    @cached_property
    def eval_exclude(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR over eval_users: every fitted item of the user (PROTOCOL: never recommended again)."""
        users = self.eval_users
        return gather_ranges(self.split.item, self.split.user_start[users], self.fitted_end(users))

    @cached_property
    def eval_relevant(self) -> tuple[np.ndarray, np.ndarray]:
        """CSR over eval_users: the user's items in the scored fold."""
        return self._csr_of(np.flatnonzero(self.split.fold == self.eval_fold))

    def _csr_of(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        slot = np.full(self.dataset.n_users, -1)
        slot[self.eval_users] = np.arange(len(self.eval_users))
        users = slot[self.split.user[positions]]
        keep = users >= 0
        return csr_from_pairs(users[keep], self.split.item[positions][keep], len(self.eval_users))
