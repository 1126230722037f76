"""Quality figures that hold up: intervals over seeds, and paired comparisons over users.

    metric per seed [S]                     --seed_interval-->  mean, 95% t-interval
    per-user NDCG@10, teacher vs candidate  --paired_difference-->  mean difference, 95% bootstrap CI
    difference + teacher mean + tolerance   --verdict-->  "beats" | "matches" | "loses" | "inconclusive"

scipy does the statistics: Student's t quantiles (3 seeds leave 2 degrees of freedom, where the
normal quantile would understate the interval by half) and the BCa bootstrap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.mean:.4f} [{self.low:.4f}, {self.high:.4f}]"


def seed_interval(values: np.ndarray | list[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean of one figure over seeds with its t-interval (a single seed: no width to give, NaN)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or not len(values):
        raise ValueError(f"seed_interval needs a non-empty 1-d array, got shape {values.shape}")
    mean = float(values.mean())
    if len(values) < 2:
        return Interval(mean, float("nan"), float("nan"), 1)
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=stats.sem(values))
    return Interval(mean, float(low), float(high), len(values))


def paired_difference(
    teacher: np.ndarray, candidate: np.ndarray, seed: int = 0, confidence: float = CONFIDENCE
) -> Interval:
    """candidate - teacher per user (same users, same order): its mean and BCa bootstrap interval.

    Users are the unit resampled: a seed-averaged per-user figure keeps the pairing and folds the
    seed-to-seed noise into each user's value.
    """
    teacher, candidate = np.asarray(teacher, np.float64), np.asarray(candidate, np.float64)
    if teacher.shape != candidate.shape or teacher.ndim != 1 or len(teacher) < 2:
        raise ValueError(
            "paired_difference needs two 1-d arrays of one length >= 2, "
            f"got {teacher.shape} and {candidate.shape}"
        )
    difference = candidate - teacher
    if np.ptp(difference) <= 1e-12:  # no spread (up to rounding): BCa is undefined; a point
        value = float(difference.mean())
        return Interval(value, value, value, len(difference))
    result = stats.bootstrap(
        (difference,),
        np.mean,
        confidence_level=confidence,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="BCa",
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return Interval(float(difference.mean()), float(ci.low), float(ci.high), len(difference))


def verdict(difference: Interval, teacher_mean: float, tolerance: float) -> str:
    """What the paired interval says of the candidate against the teacher.

    beats: the interval lies above 0. matches: it lies within +-tolerance x the teacher's mean
    (the gate's relative tolerance). loses: it lies below 0 and reaches past the tolerance.
    inconclusive: none of these (too few users or seeds to tell).

    >>> verdict(Interval(0.004, 0.001, 0.007, 943), 0.164, 0.02)
    'beats'
    >>> verdict(Interval(-0.001, -0.003, 0.002, 943), 0.164, 0.02)
    'matches'
    """
    margin = tolerance * teacher_mean
    if difference.low > 0:
        return "beats"
    if -margin <= difference.low and difference.high <= margin:
        return "matches"
    if difference.high < 0:
        return "loses"
    return "inconclusive"
