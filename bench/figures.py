"""How the bench reports write their numbers: stage names, latencies, sizes, load averages."""

from __future__ import annotations

STAGE_NAMES = {"embed": "user tower", "retrieve": "retrieval", "rank": "ranking", "total": "total"}


def median_p99(stage: dict) -> str:
    """'median / p99' in ms of one stage's latency summary."""
    return f"{stage['median_ms']:.3f} / {stage['p99_ms']:.3f}"


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def load_averages(values) -> str:
    """'0.52/0.61/0.70': the 1, 5 and 15 minute load averages."""
    return "/".join(f"{v:.2f}" for v in values)
