"""Pointwise metrics of the ranking model (PROTOCOL.md): ROC AUC and log loss, numpy-vectorised."""

from __future__ import annotations

import numpy as np


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
