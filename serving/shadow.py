"""Agreement between two top-k lists, for shadow traffic.

Two numbers per shadowed request:
  - overlap@k = |A ∩ B| / k: which items both variants would show, ignoring order;
  - RBO (rank-biased overlap, Webber et al. 2010, extrapolated form, p = 0.9): a rank
    similarity in [0, 1] that weights the top of the lists most and, unlike Kendall tau or
    Spearman, is defined for lists that share only some items (no made-up ranks for items
    missing from one list). With p = 0.9 the first 10 ranks carry ~86% of the weight.
"""

from __future__ import annotations

import numpy as np


def overlap_at_k(a: list[str], b: list[str], k: int) -> float:
    """|a[:k] ∩ b[:k]| / k (1.0 for two empty lists).

    Example:
        >>> overlap_at_k(["1", "2", "3"], ["3", "2", "9"], 3)
        0.6666666666666666
    """
    if k <= 0 or (not a and not b):
        return 1.0
    return len(set(a[:k]) & set(b[:k])) / k


def rank_biased_overlap(a: list[str], b: list[str], p: float = 0.9) -> float:
    """Extrapolated RBO of two rankings without duplicates, evaluated to depth max(len(a), len(b)).

    RBO_ext = X_k/k * p^k + (1-p)/p * sum_{d=1..k} X_d/d * p^d, where X_d = |a[:d] ∩ b[:d]|.
    Identical lists give 1.0, disjoint ones 0.0.

    Example:
        >>> rank_biased_overlap(["1", "2", "3"], ["1", "2", "3"])
        1.0
        >>> round(rank_biased_overlap(["1", "2", "3"], ["3", "2", "1"]), 3)
        0.855
    """
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    k = max(len(a), len(b))
    if k == 0:
        return 1.0
    rank_b = {item: r for r, item in enumerate(b)}
    # An item shared by both lists enters the running overlap at depth max(rank_a, rank_b) + 1.
    entered = [max(r, rank_b[item]) for r, item in enumerate(a) if item in rank_b]
    depth_counts = np.bincount(np.asarray(entered, np.int64), minlength=k)[:k]
    overlap = np.cumsum(depth_counts)  # X_d for d = 1..k
    d = np.arange(1, k + 1)
    weights = p**d
    value = overlap[-1] / k * p**k + (1 - p) / p * float(np.sum(overlap / d * weights))
    return float(min(1.0, value))
