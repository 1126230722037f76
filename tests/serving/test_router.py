"""A/B assignment: a pure function of (user_id, weights, salt), sticky and proportional."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest
from slimrec.serving.router import assign_variant, user_bucket

USERS = [f"user-{i}" for i in range(10_000)]


@pytest.mark.parametrize(
    "weights",
    [
        {"full": 50, "compressed": 50},
        {"full": 90, "compressed": 10},
        {"full": 1, "compressed": 2, "int4": 1},
        {"full": 0.3, "compressed": 0.7},
    ],
)
def test_split_within_two_points_of_weights(weights):
    counts = Counter(assign_variant(u, weights, "salt-a") for u in USERS)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert abs(counts[name] / len(USERS) - weight / total) < 0.02, (name, counts)


def test_same_user_same_variant_every_time():
    weights = {"full": 50, "compressed": 50}
    first = [assign_variant(u, weights, "salt-a") for u in USERS[:2000]]
    again = [assign_variant(u, weights, "salt-a") for u in USERS[:2000]]
    assert first == again


def test_assignment_is_stable_across_processes():
    # Python's hash() is salted per process; the router must not depend on it.
    code = (
        "from slimrec.serving.router import assign_variant;"
        "print(','.join(assign_variant(f'u{i}', {'full': 1, 'compressed': 1}, 's') for i in range(200)))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert len(runs) == 1
    assert runs.pop().strip().split(",") == [
        assign_variant(f"u{i}", {"full": 1, "compressed": 1}, "s") for i in range(200)
    ]


def test_salt_reshuffles_users():
    weights = {"full": 50, "compressed": 50}
    a = [assign_variant(u, weights, "salt-a") for u in USERS[:2000]]
    b = [assign_variant(u, weights, "salt-b") for u in USERS[:2000]]
    agreement = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    assert 0.4 < agreement < 0.6  # independent hashes agree about half the time


def test_zero_weight_is_never_chosen():
    assert {assign_variant(u, {"full": 0, "compressed": 1}, "s") for u in USERS[:1000]} == {"compressed"}
    assert {assign_variant(u, {"full": 1, "compressed": 0}, "s") for u in USERS[:1000]} == {"full"}


def test_growing_a_variant_only_moves_users_towards_it():
    # 50/50 -> 80/20: nobody on "full" moves to "compressed" (full owns the low end of the range).
    before = {u: assign_variant(u, {"full": 50, "compressed": 50}, "s") for u in USERS}
    after = {u: assign_variant(u, {"full": 80, "compressed": 20}, "s") for u in USERS}
    assert not [u for u in USERS if before[u] == "full" and after[u] != "full"]


def test_bucket_is_uniform_and_salt_separated():
    buckets = [user_bucket(u, "s") for u in USERS]
    assert 0 <= min(buckets) and max(buckets) < 1
    assert abs(sum(buckets) / len(buckets) - 0.5) < 0.01
    assert user_bucket("c", "ab") != user_bucket("bc", "a")  # salt and id are not just concatenated


@pytest.mark.parametrize("weights", [{}, {"full": 0}, {"full": 0, "compressed": 0}])
def test_weights_must_sum_to_more_than_zero(weights):
    with pytest.raises(ValueError, match="sum to more than 0"):
        assign_variant("u", weights, "s")
