"""Per-user item sets in a scipy-free CSR layout, shared by the metrics, the folds and training.

`indptr` (int64 [n_users + 1]) and `items` (int [indptr[-1]]), user u's set being
`items[indptr[u]:indptr[u + 1]]`. `csr_from_pairs` builds one from parallel (user, item)
arrays; `csr_slice` cuts out the rows of a batch.
"""

from __future__ import annotations

import numpy as np


def csr_from_pairs(rows: np.ndarray, cols: np.ndarray, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Group (row, col) pairs into a CSR layout.

    The sort is stable, so each row keeps its pairs in input order (duplicates
    are kept; metrics treat a set's duplicates as one item).

    Args:
        rows: int [n] row (user) index of each pair, in [0, n_rows).
        cols: int [n] column (item) index of each pair.
        n_rows: number of rows; rows with no pair get an empty set.

    Returns:
        (indptr, items): int64 [n_rows + 1] and [n] with `cols`' dtype.
    """
    rows = as_int_array(rows, "rows", ndim=1)
    cols = as_int_array(cols, "cols", ndim=1)
    if len(rows) != len(cols):
        raise ValueError(f"rows and cols differ in length: {len(rows)} vs {len(cols)}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be >= 0, got {n_rows}")
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise ValueError(f"rows must lie in [0, {n_rows}), got [{rows.min()}, {rows.max()}]")
    order = np.argsort(rows, kind="stable")
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols[order]


def csr_slice(indptr: np.ndarray, items: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [start, stop) of a CSR set, re-based so it lines up with a batch of score rows.

    Args:
        indptr: int64 [n_rows + 1]; items: int [indptr[-1]].
        start, stop: row range, 0 <= start <= stop <= n_rows.

    Returns:
        (indptr, items) of the slice: int64 [stop - start + 1] and a view of `items`.
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    if not 0 <= start <= stop <= len(indptr) - 1:
        raise ValueError(f"bad row range [{start}, {stop}) for {len(indptr) - 1} rows")
    return indptr[start : stop + 1] - indptr[start], np.asarray(items)[indptr[start] : indptr[stop]]


def as_int_array(values, name: str, ndim: int) -> np.ndarray:
    """`values` as an integer array of `ndim` dimensions (an empty list gives int64)."""
    array = np.asarray(values)
    if array.size == 0 and array.dtype.kind not in "iu":
        array = array.astype(np.int64)  # np.asarray([]) is float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return array


def check_csr(indptr, items, n_rows: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(indptr as int64, items) after checking they form a CSR set of `n_rows` rows."""
    indptr = as_int_array(indptr, f"{name}_indptr", ndim=1).astype(np.int64, copy=False)
    items = as_int_array(items, f"{name}_items", ndim=1)
    if len(indptr) != n_rows + 1:
        raise ValueError(f"{name}_indptr has length {len(indptr)}, expected n_users + 1 = {n_rows + 1}")
    if indptr[0] != 0 or indptr[-1] != len(items) or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}_indptr must start at 0, be non-decreasing and end at len(items)")
    if len(items) and items.min() < 0:
        raise ValueError(f"{name}_items must be non-negative item indices")
    return indptr, items


def csr_entry_rows(indptr: np.ndarray) -> np.ndarray:
    """Row index of every CSR entry, int64 [indptr[-1]]."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
