"""Ranking metrics of PROTOCOL.md (Recall@K, HR@10, NDCG@10, MRR@10), numpy-vectorised.

    scores [n_users, n_items] --top_k_excluding--> top_items [n_users, K]
    top_items + relevant CSR  --ranking_metrics--> {"recall@10": ..., ...}

Relevant sets are CSR (`slimrec.models.csr`); ranked lists come from
`slimrec.models.top_k.top_k_excluding`. The metric definitions are the binding ones of
PROTOCOL.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from slimrec.models.csr import as_int_array, check_csr, csr_entry_rows
from slimrec.models.top_k import PAD

# NDCG, HR and MRR are fixed at 10 by the protocol; recall varies with `ks`.
CUTOFF = 10
DEFAULT_KS = (10, 50, 200)


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
    top_items = as_int_array(top_items, "top_items", ndim=2)
    relevant_indptr, relevant_items = check_csr(
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
    rows = csr_entry_rows(relevant_indptr)
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
