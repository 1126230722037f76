"""models/significance.py: t-intervals over seeds, the paired bootstrap over users, the verdict."""

from __future__ import annotations

import numpy as np
import pytest
from slimrec.models.significance import Interval, paired_difference, seed_interval, verdict

# Student's t 97.5% quantile with 2 degrees of freedom (3 seeds), from a printed table.
T_975_DF2 = 4.302653


def test_seed_interval_is_the_t_interval_by_hand():
    values = [0.160, 0.166, 0.163]
    mean = sum(values) / 3
    sd = (sum((v - mean) ** 2 for v in values) / 2) ** 0.5
    half = T_975_DF2 * sd / 3**0.5
    got = seed_interval(values)
    assert got.n == 3
    assert got.mean == pytest.approx(mean, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half), abs=1e-6)


def test_one_seed_has_a_mean_and_no_interval():
    got = seed_interval([0.2])
    assert got.mean == 0.2 and got.n == 1 and np.isnan(got.low) and np.isnan(got.high)


@pytest.mark.parametrize("values", [[], [[0.1, 0.2]]])
def test_seed_interval_refuses_empty_or_nested(values):
    with pytest.raises(ValueError, match="non-empty 1-d"):
        seed_interval(values)


def test_paired_difference_is_candidate_minus_teacher_and_reproducible():
    rng = np.random.default_rng(7)
    teacher = rng.random(500)
    candidate = teacher + 0.05 + rng.normal(0, 0.01, 500)  # clearly better, little noise
    got = paired_difference(teacher, candidate, seed=3)
    assert got.mean == pytest.approx(float(np.mean(candidate - teacher)))
    assert 0 < got.low < got.mean < got.high < 0.1
    assert got == paired_difference(teacher, candidate, seed=3)  # fixed seed: same interval
    assert verdict(got, float(teacher.mean()), 0.02) == "beats"


def test_pairing_matters_an_unpaired_shift_hidden_by_user_spread_is_found():
    # Users differ far more than the variants do: only the pairing sees the 0.01 gain.
    rng = np.random.default_rng(0)
    teacher = rng.random(300)
    got = paired_difference(teacher, teacher + 0.01)
    assert got.low == got.high == pytest.approx(0.01)  # no spread in the differences: a point


def test_paired_difference_refuses_unpaired_inputs():
    with pytest.raises(ValueError, match="one length"):
        paired_difference(np.zeros(5), np.zeros(6))


@pytest.mark.parametrize(
    ("low", "high", "expected"),
    [
        (0.001, 0.006, "beats"),  # above 0
        (-0.003, 0.003, "matches"),  # within +-0.02 x 0.2 = 0.004
        (-0.003, -0.001, "matches"),  # lower, but within the tolerance
        (-0.010, -0.005, "loses"),  # below 0 and past the tolerance
        (-0.010, 0.002, "inconclusive"),  # reaches past the tolerance and across 0
    ],
)
def test_verdict(low, high, expected):
    assert verdict(Interval((low + high) / 2, low, high, 900), teacher_mean=0.2, tolerance=0.02) == expected
