"""User state -> model inputs: history windows, seen items, user codes and feature rows, built once.

A user's state is a range of item indices in time order, `items[start:end]`. Training cuts it
before every fitted row, offline evaluation and serving at the end of the fitted rows
(`Fold.user_state`, `ServedModel.known_users` over the artifact's fitted CSR), and a request's
sent history is a range of its own. All of them build model inputs with these functions, so
the model sees byte-identical inputs for the same user on either side.

Models speak codes (slimrec.artifact.features): `index + 1`, with 0 for "no item" (history
padding) and "unknown user". Every model input here is int64, what the ONNX graphs take.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from slimrec.artifact.features import FeatureSpace


class UserInputs(NamedTuple):
    """What the user tower and the ranker take about B users."""

    codes: np.ndarray  # int64 [B], 0 = unknown user
    features: np.ndarray  # int64 [B, F]
    history: np.ndarray  # int64 [B, N] item codes, right-aligned, 0-padded on the left


# --- histories ---------------------------------------------------------------------------------


def history_window(items: np.ndarray, starts: np.ndarray, ends: np.ndarray, history_len: int) -> np.ndarray:
    """Item codes of the last `history_len` items of each range `items[starts[b]:ends[b]]`.

    Training asks at every fitted row (`ends` = the row's position, so the row itself is left
    out); serving and evaluation at the end of a user's fitted items; a sent history is a range
    of its own (`sent_history_window`). The same call for all three is what keeps them equal.

    Args:
        items: int [n] item indices, each user's contiguous and oldest first (a CSR's values,
            or every interaction in protocol order).
        starts: int [B] where each row's user begins in `items` (the window never reaches before).
        ends: int [B] where each row's history ends, exclusive.
        history_len: N, the window's width.

    Returns:
        int64 [B, N] item codes (index + 1), most recent last, 0-padded on the left.

    Example:
        >>> items = np.array([4, 5, 6, 7, 8])  # user A: rows 0..2, user B: rows 3..4
        >>> history_window(items, np.array([0, 3]), np.array([2, 5]), 3)
        array([[0, 5, 6],
               [0, 8, 9]])
    """
    starts, ends = np.asarray(starts), np.asarray(ends)
    idx = ends[:, None] - np.arange(history_len, 0, -1)[None, :]
    if not len(items):  # no range holds anything: all padding (and nothing to gather from)
        return np.zeros(idx.shape, np.int64)
    codes = items[np.maximum(idx, 0)].astype(np.int64) + 1
    return np.where(idx >= starts[:, None], codes, 0)


def sent_history_window(lists: Sequence[np.ndarray], history_len: int) -> np.ndarray:
    """`history_window` of B item lists sent with requests (item indices, oldest first).

    Returns:
        int64 [B, N] item codes, the layout `history_window` gives a known user.

    Example:
        >>> sent_history_window([np.array([0, 1, 2, 3]), np.array([6])], 3)
        array([[2, 3, 4],
               [0, 0, 7]])
    """
    indptr, items = lists_as_csr(lists)
    return history_window(items, indptr[:-1], indptr[1:], history_len)


# --- seen items (what a user is not recommended again) -------------------------------------------


def gather_ranges(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ranges `values[starts[b]:ends[b]]` as one CSR, each range in its order.

    Args:
        values: [n] (item indices: the fitted items of every user, each user's contiguous).
        starts, ends: int [B] each row's range in `values`.

    Returns:
        (indptr int64 [B + 1], gathered [indptr[-1]] in `values`' dtype).

    Example:
        >>> gather_ranges(np.array([10, 11, 12, 13]), np.array([1, 0]), np.array([3, 1]))
        (array([0, 2, 3]), array([11, 12, 10]))
    """
    starts = np.asarray(starts)
    lengths = np.asarray(ends) - starts
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    take = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1])
    return indptr, values[take]


def csr_rows(indptr: np.ndarray, values: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """These rows of the CSR (indptr, values) as a CSR of their own: e.g. known users' seen items.

    Returns:
        (indptr int64 [len(rows) + 1], values in `values`' dtype).
    """
    return gather_ranges(values, indptr[rows], indptr[rows + 1])


def empty_csr(n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A CSR of n_rows empty rows (int64 indptr [n_rows + 1], int64 values [0]): nothing excluded."""
    return np.zeros(n_rows + 1, np.int64), np.zeros(0, np.int64)


def lists_as_csr(lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """B integer lists as one CSR: (indptr int64 [B + 1], values int64, the lists concatenated)."""
    lengths = np.fromiter(map(len, lists), np.int64, len(lists))
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    parts = [np.asarray(values, np.int64) for values in lists]
    return indptr, np.concatenate(parts) if parts else np.zeros(0, np.int64)


# --- user codes and side features ----------------------------------------------------------------


def user_codes(users: np.ndarray) -> np.ndarray:
    """int64 [B] user codes of user indices [B]; index -1 (an unknown user) gives code 0."""
    return np.asarray(users).astype(np.int64) + 1


def user_feature_rows(table: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """int64 [B, F]: the rows of a user feature table [n_users + 1, F] (row = user code; row 0,
    the unknown user, all zeros). The artifact stores it as int32; models take int64."""
    return table[codes].astype(np.int64, copy=False)


def sent_user_features(space: FeatureSpace, sent: Sequence[dict]) -> np.ndarray:
    """int64 [B, F] side features sent with B requests of unknown users (age, gender, occupation,
    zip_code; missing or None ones encode as unknown, 0), encoded as the fitted table was."""
    return space.encode_user_features(
        np.array([-1 if s.get("age") is None else s["age"] for s in sent]),
        np.array([s.get("gender") or "" for s in sent], dtype=object),
        np.array([s.get("occupation") or "" for s in sent], dtype=object),
        np.array([s.get("zip_code") or "" for s in sent], dtype=object),
    )


def user_inputs(
    users: np.ndarray,
    feature_table: np.ndarray,
    items: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    history_len: int,
) -> UserInputs:
    """Model inputs of known users whose histories are `items[starts[b]:ends[b]]`.

    Args:
        users: int [B] user indices.
        feature_table: int [n_users + 1, F] side features by user code.
        items, starts, ends, history_len: as `history_window` takes them.

    Returns:
        UserInputs: codes int64 [B], features int64 [B, F], history int64 [B, N].

    Example (a fold at the end of its fitted rows; a served model over its fitted CSR):
        >>> user_inputs(users, fold.user_features, fold.split.item, start, start + fold.fit_counts[users], 50)
        >>> user_inputs(users, model.user_features, model.fitted_items, model.fitted_indptr[users],
        ...             model.fitted_indptr[users + 1], model.space.history_len)
    """
    codes = user_codes(users)
    return UserInputs(
        codes, user_feature_rows(feature_table, codes), history_window(items, starts, ends, history_len)
    )
