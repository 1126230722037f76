"""The ranker's training lists: cut points in each user's fitted sequence, their positives and negatives.

Vectorised over all lists of an epoch at once (NumPy and one batched user-tower pass); no
per-user Python. `ranker_lists` is what one ranker epoch trains on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from slimrec.artifact.user_state import gather_ranges
from slimrec.models.evaluate import exact_top_k
from slimrec.models.fold import Fold
from slimrec.models.two_tower import TwoTower


@dataclass
class RankerData:
    """How the ranker's training lists are drawn from the fitted rows."""

    cut_points: int = 4  # per user per epoch: prediction times inside the fitted sequence
    max_positives: int = 10  # the next interactions after a cut point
    hard_negatives: int = 30  # retrieved candidates the user never interacted with
    random_negatives: int = 10
    candidates: int = 200
    max_users: int | None = None  # sample this many users per epoch (large catalogues); None = all


def ranker_lists(
    fold: Fold,
    retrieval: TwoTower,
    item_emb: np.ndarray,
    fitted: FittedPairs,
    data: RankerData,
    rng: np.random.Generator,
):
    """One epoch of training lists: (users [L], cut [L], candidates [L, C], labels [L, C]).

    A cut point is a prediction time inside a user's fitted sequence; its positives are the
    next interactions, its negatives retrieved candidates and random items the user never rated.
    """
    counts = fold.fit_counts
    eligible = np.flatnonzero(counts >= 2)
    if data.max_users is not None and len(eligible) > data.max_users:
        eligible = np.sort(rng.choice(eligible, data.max_users, replace=False))
    users = np.repeat(eligible, data.cut_points)
    start = fold.split.user_start[users]
    n = counts[users]
    # Cut somewhere in the second half, where the history resembles serving time.
    cut = start + n // 2 + (rng.random(len(users)) * (n - n // 2)).astype(np.int64)
    cut = np.minimum(cut, start + n - 1)
    n_pos = np.minimum(data.max_positives, np.maximum(1, np.round(0.1 * n))).astype(np.int64)
    n_pos = np.minimum(n_pos, start + n - cut)

    u_emb = user_embeddings_before(retrieval, fold, users, cut)
    exclude = gather_ranges(fold.split.item, start, cut)  # the items before the cut, as at serving time
    retrieved, _ = exact_top_k(u_emb, item_emb, data.candidates, exclude)

    width = data.max_positives + data.hard_negatives + data.random_negatives
    cands = np.full((len(users), width), -1, np.int64)
    labels = np.zeros((len(users), width), np.float32)
    offs = np.arange(data.max_positives)
    pos_ok = offs[None, :] < n_pos[:, None]
    pos_items = fold.split.item[np.minimum(cut[:, None] + offs[None, :], len(fold.split.item) - 1)]
    cands[:, : data.max_positives] = np.where(pos_ok, pos_items, -1)
    labels[:, : data.max_positives] = pos_ok

    never_rated = ~fitted.contains(users, retrieved)
    hard = sample_true(never_rated & (retrieved >= 0), data.hard_negatives, rng)
    cands[:, data.max_positives : data.max_positives + data.hard_negatives] = np.where(
        hard >= 0, np.take_along_axis(retrieved, np.maximum(hard, 0), 1), -1
    )
    randoms = rng.integers(0, fold.dataset.n_items, size=(len(users), data.random_negatives))
    randoms = np.where(fitted.contains(users, randoms), -1, randoms)
    cands[:, -data.random_negatives :] = randoms
    return users, cut, cands, labels


def user_embeddings_before(
    retrieval: TwoTower, fold: Fold, users: np.ndarray, cut: np.ndarray, chunk: int = 4096
) -> np.ndarray:
    """[L, D]: each list's user embedded from the history before its cut, in chunks of lists:
    the attention encoder's activations for all of an epoch's lists at once (48k lists on
    ML-1M) peaked at 13 GiB."""
    retrieval.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(users), chunk):
            inputs = fold.inputs_before(users[s : s + chunk], cut[s : s + chunk])
            out.append(retrieval.user_tower(*(torch.from_numpy(a) for a in inputs)).numpy())
    return np.concatenate(out) if out else np.zeros((0, retrieval.config.out_dim), np.float32)


class FittedPairs:
    """Each user's fitted items as sorted (user, item) keys: membership of a whole [L, C] block in one
    `searchsorted`, the keys sorted once per stage rather than once per call."""

    def __init__(self, csr: tuple[np.ndarray, np.ndarray], n_items: int):
        indptr, members = csr
        self.stride = n_items + 1
        owners = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
        self.keys = np.sort(owners * self.stride + members)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """[L, C] bool: is items[l, c] among user users[l]'s fitted items."""
        query = users[:, None].astype(np.int64) * self.stride + items
        found = np.searchsorted(self.keys, query)
        return (found < len(self.keys)) & (self.keys[np.minimum(found, len(self.keys) - 1)] == query)


def sample_true(ok: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, up to k random column indices where ok is True (-1 padding)."""
    keys = np.where(ok, rng.random(ok.shape), 2.0)
    picked = np.argsort(keys, axis=1)[:, :k]
    return np.where(np.take_along_axis(ok, picked, 1), picked, -1)
