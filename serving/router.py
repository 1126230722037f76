"""A/B routing: a pure, sticky, deterministic choice of variant per user.

The hash is blake2b over (salt, user_id), not Python's `hash` (salted per process), so a
user lands on the same variant across restarts, replicas and languages. Changing the salt
reshuffles everyone; changing the weights moves only the users whose bucket crosses a
boundary (variants keep their order), which keeps assignments as sticky as a split allows.
"""

from __future__ import annotations

import hashlib

_BUCKETS = 1 << 64


def user_bucket(user_id: str, salt: str) -> float:
    """A uniform number in [0, 1) fixed by (salt, user_id).

    Example:
        >>> 0 <= user_bucket("196", "slimrec-ab-1") < 1
        True
    """
    # Length-prefix the salt so ("a", "bc") and ("ab", "c") hash differently.
    key = f"{len(salt)}:{salt}:{user_id}".encode()
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") / _BUCKETS


def assign_variant(user_id: str, weights: dict[str, float], salt: str) -> str:
    """Pick the variant for a user in proportion to `weights`, the same every time.

    Args:
        user_id: raw user id (any string; unknown users are routed too).
        weights: variant -> non-negative weight, summing to more than 0; order matters
            (it fixes which hash range each variant owns), so pass the same order each time.
        salt: experiment salt.

    Returns:
        The variant name; never one whose weight is 0.

    Example:
        >>> assign_variant("196", {"full": 50, "compressed": 50}, "slimrec-ab-1") in ("full", "compressed")
        True
    """
    total = sum(weights.values())
    if not total > 0:
        raise ValueError("weights must sum to more than 0")
    point = user_bucket(user_id, salt) * total
    cumulative = 0.0
    chosen = None
    for name, weight in weights.items():
        if weight <= 0:
            continue
        chosen = name  # floating-point rounding at the top end falls to the last positive variant
        cumulative += weight
        if point < cumulative:
            break
    assert chosen is not None
    return chosen
