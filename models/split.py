"""The per-user temporal split of ../shared/PROTOCOL.md, implemented once.

Every training run and every evaluation takes its folds from `protocol_split`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from slimrec.models.data import Dataset

TRAIN, VALID, TEST = 0, 1, 2


@dataclass(frozen=True)
class Split:
    """Interactions in protocol order (user, then timestamp, then item) with a fold per row.

    `order` indexes `dataset.interactions`; `user`, `item`, `fold` are already in that order,
    so each user's rows are contiguous: `user_start[u] : user_start[u + 1]`.
    """

    order: np.ndarray  # int64 [n]
    user: np.ndarray  # int32 [n]
    item: np.ndarray  # int32 [n]
    timestamp: np.ndarray  # int64 [n]
    fold: np.ndarray  # int8 [n]
    user_start: np.ndarray  # int64 [n_users + 1]

    def rows(self, *folds: int) -> np.ndarray:
        """Positions (into the ordered arrays) of the rows in any of `folds`."""
        return np.flatnonzero(np.isin(self.fold, folds))

    def fingerprint(self) -> str:
        import hashlib

        return hashlib.sha256(self.order.tobytes() + self.fold.tobytes()).hexdigest()


def holdout_sizes(n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n_valid, n_test) per user: max(1, round(0.1 n)) each, round half to even like Python's."""
    n_holdout = np.maximum(1, np.round(0.1 * n.astype(np.float64))).astype(np.int64)
    return n_holdout, n_holdout.copy()


def protocol_split(dataset: Dataset) -> Split:
    inter = dataset.interactions
    # Item indices follow raw-id order (models.data.sorted_ids), so this is (timestamp, item_id).
    order = np.lexsort((inter.item, inter.timestamp, inter.user))
    user = inter.user[order]
    counts = np.bincount(user, minlength=dataset.n_users).astype(np.int64)
    user_start = np.concatenate([[0], np.cumsum(counts)])
    position = np.arange(len(order)) - user_start[user]
    n_valid, n_test = holdout_sizes(counts)
    from_end = counts[user] - position  # 1 for a user's last interaction
    fold = np.full(len(order), TRAIN, dtype=np.int8)
    fold[from_end <= n_test[user] + n_valid[user]] = VALID
    fold[from_end <= n_test[user]] = TEST
    return Split(
        order=order,
        user=user,
        item=inter.item[order],
        timestamp=inter.timestamp[order],
        fold=fold,
        user_start=user_start,
    )
