"""The quality gate: may the compressed model be promoted beside the teacher?"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GateConfig:
    tolerance: float = 0.02  # relative: compressed >= teacher * (1 - tolerance)
    metrics: tuple[str, ...] = ("ndcg@10", "recall@200")
    # The ranker's candidate budget (compression/tune_candidates.py): walking down from the largest,
    # the last of these before the first whose validation two-stage NDCG@10 falls below the
    # largest's x (1 - candidate_tolerance). A quarter of the gate's tolerance, so the budget
    # spends little of what the gate allows; () keeps 200.
    candidate_budgets: tuple[int, ...] = (200, 150, 100, 50)
    candidate_tolerance: float = 0.005

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        self.candidate_budgets = tuple(sorted(set(self.candidate_budgets), reverse=True))
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"gate.tolerance must be in [0, 1), got {self.tolerance}")
        if not 0 <= self.candidate_tolerance < 1:
            raise ValueError(f"gate.candidate_tolerance must be in [0, 1), got {self.candidate_tolerance}")
        if any(type(n) is not int or n < 10 for n in self.candidate_budgets):
            raise ValueError(
                "gate.candidate_budgets must be integers >= 10 (NDCG@10 ranks 10), "
                f"got {self.candidate_budgets}"
            )


def gate(teacher_metrics: dict, candidate_metrics: dict, config: GateConfig) -> list[str]:
    """Failures of the quality gate on validation two-stage metrics; empty when promotable.

    Example (tolerance 0.02: the candidate needs ndcg@10 >= 0.170 * 0.98 = 0.1666):
        >>> gate({"two_stage": {"valid": {"ndcg@10": 0.170}}},
        ...      {"two_stage": {"valid": {"ndcg@10": 0.167}}}, GateConfig(metrics=("ndcg@10",)))
        []
    """
    failures = []
    for name in config.metrics:
        t = teacher_metrics["two_stage"]["valid"][name]
        c = candidate_metrics["two_stage"]["valid"][name]
        if c < t * (1 - config.tolerance):
            failures.append(
                f"two-stage {name} on validation {c:.4f} < teacher {t:.4f} x "
                f"(1 - {config.tolerance:g}) = {t * (1 - config.tolerance):.4f}"
            )
    return failures
