"""Evaluation metrics of PROTOCOL.md, numpy-vectorised.

Per-user sets (relevant items, items to exclude from ranking) travel in a
scipy-free CSR layout: `indptr` (int64 [n_users + 1]) and `items` (int
[indptr[-1]]), user u's set being `items[indptr[u]:indptr[u + 1]]`.
`csr_from_pairs` builds one from parallel (user, item) arrays.

Ranking pipeline:
    scores [n_users, n_items] --top_k_excluding--> top_items [n_users, K]
    top_items + relevant CSR  --ranking_metrics--> {"recall@10": ..., ...}

The metric definitions (Recall@K, HR@10, NDCG@10, MRR@10, AUC, log loss) are
the binding ones of PROTOCOL.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# NDCG, HR and MRR are fixed at 10 by the protocol; recall varies with `ks`.
CUTOFF = 10
DEFAULT_KS = (10, 50, 200)
PAD = -1  # "no item" in a ranked list; never a hit


# --------------------------------------------------------------------------- CSR helpers


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
    rows = _as_int_array(rows, "rows", ndim=1)
    cols = _as_int_array(cols, "cols", ndim=1)
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


def _as_int_array(values, name: str, ndim: int) -> np.ndarray:
    array = np.asarray(values)
    if array.size == 0 and array.dtype.kind not in "iu":
        array = array.astype(np.int64)  # np.asarray([]) is float64
    if array.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array, got dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    return array


def _check_csr(indptr, items, n_rows: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    indptr = _as_int_array(indptr, f"{name}_indptr", ndim=1).astype(np.int64, copy=False)
    items = _as_int_array(items, f"{name}_items", ndim=1)
    if len(indptr) != n_rows + 1:
        raise ValueError(f"{name}_indptr has length {len(indptr)}, expected n_users + 1 = {n_rows + 1}")
    if indptr[0] != 0 or indptr[-1] != len(items) or np.any(np.diff(indptr) < 0):
        raise ValueError(f"{name}_indptr must start at 0, be non-decreasing and end at len(items)")
    if len(items) and items.min() < 0:
        raise ValueError(f"{name}_items must be non-negative item indices")
    return indptr, items


def _csr_rows(indptr: np.ndarray) -> np.ndarray:
    """Row index of every CSR entry, int64 [indptr[-1]]."""
    return np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))


# --------------------------------------------------------------------------- ranking


def top_k_excluding(
    scores: np.ndarray, k: int, exclude_indptr: np.ndarray, exclude_items: np.ndarray
) -> np.ndarray:
    """Full-catalogue top-k per user, skipping each user's excluded items.

    Order is score descending, ties broken by lower item index, so the result
    is deterministic. Excluded items are never returned: a row with fewer than
    k non-excluded items is padded with -1 on the right (items scored -inf
    that are not excluded are still returned). `scores` is not modified.

    Args:
        scores: float [n_users, n_items] (float32 expected; wider floats are
            compared at float32 precision); NaN is rejected.
        k: number of items to return per user, >= 1 (may exceed n_items).
        exclude_indptr, exclude_items: CSR of items to skip per user (row u of
            the CSR is row u of `scores`; see `csr_slice` for batches).

    Returns:
        int64 [n_users, k] item indices, best first, -1 padded.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.dtype.kind != "f":
        raise ValueError(f"scores must be a 2-D float array, got {scores.dtype} {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_users, n_items = scores.shape
    exclude_indptr, exclude_items = _check_csr(exclude_indptr, exclude_items, n_users, "exclude")
    if len(exclude_items) and exclude_items.max() >= n_items:
        raise ValueError(f"exclude_items holds item {exclude_items.max()} >= n_items {n_items}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")

    keys = _rank_keys(scores)
    excluded = np.iinfo(np.int64).max  # ranks after every real key (see _rank_keys)
    keys[_csr_rows(exclude_indptr), exclude_items] = excluded

    width = min(k, n_items)
    top = np.argpartition(keys, width - 1, axis=1)[:, :width] if width < n_items else _all_columns(keys)
    # Keys are unique within a row, so this sort fully determines the order.
    top = np.take_along_axis(top, np.argsort(np.take_along_axis(keys, top, axis=1), axis=1), axis=1)

    result = np.full((n_users, k), PAD, dtype=np.int64)
    result[:, :width] = np.where(np.take_along_axis(keys, top, axis=1) == excluded, PAD, top)
    return result


def _rank_keys(scores: np.ndarray) -> np.ndarray:
    """Unique int64 key per (row, item): smaller = better; by score desc, then item index asc.

    Scores go to float32 and their bits to an order-preserving int32; packing
    (reversed score, item index) into one int64 makes ties impossible, so
    argpartition's choice at the k-th boundary is deterministic.
    """
    n_items = scores.shape[1]
    if n_items >= 2**31:
        raise ValueError("too many items for int64 rank keys")
    # In-place steps throughout: this runs on whole score matrices (a 7x speed-up over temporaries).
    ordered = scores.astype(np.float32, copy=True)
    ordered += np.float32(0.0)  # turns -0.0 into +0.0 so the two tie, as they compare equal
    ordered = ordered.view(np.int32)
    negative_mask = ordered >> 31
    negative_mask &= np.int32(0x7FFFFFFF)
    ordered ^= negative_mask  # now monotone in the float value
    keys = np.empty(scores.shape, dtype=np.int64)
    np.invert(ordered, out=keys)  # higher score -> smaller key, without overflow
    keys <<= 32
    keys |= np.arange(n_items, dtype=np.int64)
    return keys


def _all_columns(keys: np.ndarray) -> np.ndarray:
    return np.broadcast_to(np.arange(keys.shape[1], dtype=np.int64), keys.shape)


def hit_matrix(top_items: np.ndarray, relevant_indptr: np.ndarray, relevant_items: np.ndarray) -> np.ndarray:
    """Which ranked items are relevant.

    Args:
        top_items: int [n_users, K] ranked item indices, -1 = padding (never a hit).
            An item may appear at most once per row.
        relevant_indptr, relevant_items: CSR of relevant items per user.

    Returns:
        bool [n_users, K]: hits[u, j] = top_items[u, j] is in user u's relevant set.
    """
    top_items, relevant_indptr, relevant_items = _check_ranking_inputs(
        top_items, relevant_indptr, relevant_items
    )
    relevant_keys, bound = _relevant_keys(top_items, relevant_indptr, relevant_items)
    return _hits_from_keys(top_items, relevant_keys, bound)


def _check_ranking_inputs(top_items, relevant_indptr, relevant_items):
    top_items = _as_int_array(top_items, "top_items", ndim=2)
    relevant_indptr, relevant_items = _check_csr(
        relevant_indptr, relevant_items, top_items.shape[0], "relevant"
    )
    if top_items.size and top_items.min() < PAD:
        raise ValueError("top_items must hold item indices >= 0 or -1 padding")
    # A repeated item would count as two hits (recall > 1): a bug upstream, so refuse it.
    ordered = np.sort(top_items, axis=1)
    if np.any((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] != PAD)):
        raise ValueError("top_items repeats an item within a user's list")
    return top_items, relevant_indptr, relevant_items


def _relevant_keys(top_items, relevant_indptr, relevant_items) -> tuple[np.ndarray, int]:
    """Sorted unique int64 keys user * bound + item of the relevant pairs, and the bound."""
    bound = 1 + max(
        int(top_items.max()) if top_items.size else 0,
        int(relevant_items.max()) if len(relevant_items) else 0,
    )
    rows = _csr_rows(relevant_indptr)
    return np.unique(rows * bound + relevant_items.astype(np.int64)), bound


def _hits_from_keys(top_items: np.ndarray, relevant_keys: np.ndarray, bound: int) -> np.ndarray:
    if len(relevant_keys) == 0:
        return np.zeros(top_items.shape, dtype=bool)
    users = np.arange(top_items.shape[0], dtype=np.int64)[:, None]
    top_keys = users * bound + top_items.astype(np.int64)
    # searchsorted on the sorted keys: a membership test for every (user, ranked item) at once.
    position = np.minimum(np.searchsorted(relevant_keys, top_keys), len(relevant_keys) - 1)
    return (relevant_keys[position] == top_keys) & (top_items != PAD)


def per_user_ranking_metrics(
    top_items: np.ndarray,
    relevant_indptr: np.ndarray,
    relevant_items: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, np.ndarray]:
    """PROTOCOL.md ranking metrics for each user that has at least one relevant item.

    Duplicate relevant items count once. If `top_items` has fewer than k
    columns, recall@k (and the @10 metrics) use the columns there are, i.e.
    the list is treated as ending early; IDCG still assumes 10 slots.

    Args:
        top_items: int [n_users, K] ranked item indices, best first, -1 padded.
        relevant_indptr, relevant_items: CSR of relevant items per user.
        ks: cut-offs for recall.

    Returns:
        {"user": int64 [m] indices of the evaluated users,
         "recall@k" for k in ks, "ndcg@10", "hr@10", "mrr@10": float64 [m]}.
    """
    ks = _check_ks(ks)
    top_items, relevant_indptr, relevant_items = _check_ranking_inputs(
        top_items, relevant_indptr, relevant_items
    )
    relevant_keys, bound = _relevant_keys(top_items, relevant_indptr, relevant_items)
    n_relevant = np.bincount(relevant_keys // bound, minlength=top_items.shape[0])
    evaluated = np.flatnonzero(n_relevant > 0)
    hits = _hits_from_keys(top_items, relevant_keys, bound)[evaluated]
    n_relevant = n_relevant[evaluated]

    metrics: dict[str, np.ndarray] = {"user": evaluated.astype(np.int64)}
    for k in ks:
        metrics[f"recall@{k}"] = hits[:, :k].sum(axis=1) / n_relevant
    hits_at_cutoff = np.zeros((len(evaluated), CUTOFF), dtype=bool)  # pads short lists with misses
    width = min(CUTOFF, hits.shape[1])
    hits_at_cutoff[:, :width] = hits[:, :width]
    metrics[f"ndcg@{CUTOFF}"] = _ndcg(hits_at_cutoff, n_relevant)
    metrics[f"hr@{CUTOFF}"] = hits_at_cutoff.any(axis=1).astype(np.float64)
    metrics[f"mrr@{CUTOFF}"] = _reciprocal_rank(hits_at_cutoff)
    return metrics


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive cut-offs, got {ks}")
    return tuple(dict.fromkeys(ks))


def _ndcg(hits: np.ndarray, n_relevant: np.ndarray) -> np.ndarray:
    """Binary NDCG over the columns of `hits` [m, c]; IDCG over min(c, |relevant|) hits."""
    discounts = 1.0 / np.log2(np.arange(2, hits.shape[1] + 2))
    ideal = np.cumsum(discounts)[np.minimum(n_relevant, hits.shape[1]) - 1]
    return (hits @ discounts) / ideal


def _reciprocal_rank(hits: np.ndarray) -> np.ndarray:
    first = np.argmax(hits, axis=1)  # 0 when no hit; masked below
    return np.where(hits.any(axis=1), 1.0 / (first + 1), 0.0)


def ranking_metrics(
    top_items: np.ndarray,
    relevant_indptr: np.ndarray,
    relevant_items: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """PROTOCOL.md ranking metrics averaged over users with at least one relevant item.

    Users with an empty relevant set are skipped. If `top_items` has fewer than
    k columns, recall@k uses the columns there are (the list ends early). With
    no user to average over, every metric is NaN and "users" is 0.

    Args:
        top_items: int [n_users, K_max] ranked item indices, best first, -1 padded.
        relevant_indptr: int64 [n_users + 1]; relevant_items: int [nnz]; CSR of relevant sets.
        ks: cut-offs for recall (NDCG, HR and MRR are always @10).

    Returns:
        {"recall@k" for k in ks, "ndcg@10", "hr@10", "mrr@10": float, "users": int}.
    """
    per_user = per_user_ranking_metrics(top_items, relevant_indptr, relevant_items, ks)
    users = len(per_user.pop("user"))
    summary: dict[str, float] = {
        name: float(values.mean()) if users else float("nan") for name, values in per_user.items()
    }
    summary["users"] = users
    return summary


def per_user_ndcg_at_10(
    top_items: np.ndarray, relevant_indptr: np.ndarray, relevant_items: np.ndarray
) -> np.ndarray:
    """NDCG@10 of each user with at least one relevant item (same users and order as ranking_metrics).

    Args: as `ranking_metrics`.

    Returns:
        float64 [m]; its mean is ranking_metrics(...)["ndcg@10"].
    """
    return per_user_ranking_metrics(top_items, relevant_indptr, relevant_items, ks=(CUTOFF,))["ndcg@10"]


def standard_error(values: np.ndarray) -> float:
    """Standard error of the mean: sample std (ddof=1) / sqrt(n); NaN for fewer than 2 values.

    Args:
        values: float [n] per-user metric values.

    Returns:
        The standard error as a float.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    if len(values) < 2:
        return float("nan")
    return float(values.std(ddof=1) / np.sqrt(len(values)))


# --------------------------------------------------------------------------- pointwise (ranking model)


def _check_binary_labels(labels, n: int) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if len(labels) != n:
        raise ValueError(f"labels and predictions differ in length: {len(labels)} vs {n}")
    if n == 0:
        raise ValueError("no rows to score")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0/1")
    return labels.astype(bool)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney U statistic; tied scores get average ranks (a tie counts 1/2).

    Args:
        labels: [n] 0/1 (or bool) labels.
        scores: [n] real scores, higher = more likely positive; NaN rejected.

    Returns:
        P(score of a random positive > score of a random negative), ties counted as 1/2.

    Raises:
        ValueError: if only one class is present.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    labels = _check_binary_labels(labels, len(scores))
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    n_positive = int(labels.sum())
    n_negative = len(labels) - n_positive
    if n_positive == 0 or n_negative == 0:
        only = "negatives" if n_positive == 0 else "positives"
        raise ValueError(f"AUC needs both classes; got only {only}")
    ranks = _average_ranks(scores)
    u_statistic = ranks[labels].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values` [n], tied values sharing the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    group_start = np.r_[True, sorted_values[1:] != sorted_values[:-1]]
    group_id = np.cumsum(group_start) - 1
    starts = np.flatnonzero(group_start)
    ends = np.r_[starts[1:], len(values)]  # exclusive
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = ((starts + 1 + ends) / 2.0)[group_id]  # mean of ranks start+1 .. end
    return ranks


def log_loss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps] (in float64).

    Args:
        labels: [n] 0/1 (or bool) labels.
        probabilities: [n] predicted P(label = 1), each in [0, 1].
        eps: clipping so that a confident miss costs -log(eps), not infinity.

    Returns:
        -mean(y log p + (1 - y) log(1 - p)).
    """
    probabilities = np.asarray(probabilities, dtype=np.float64).ravel()
    labels = _check_binary_labels(labels, len(probabilities))
    if not np.all((probabilities >= 0) & (probabilities <= 1)):  # also catches NaN
        raise ValueError("probabilities must lie in [0, 1]")
    clipped = np.clip(probabilities, eps, 1.0 - eps)
    return float(-np.mean(np.where(labels, np.log(clipped), np.log1p(-clipped))))
