"""Wall seconds, CPU seconds and peak RSS per named stage of a command (train, compress).

CPU time (user + system of the whole process, every thread) is the figure to compare
across runs on a shared machine: a neighbour slows wall time, far less CPU time.
Peak RSS is the process's high-water mark when the stage ends, so the first stage
whose figure jumps is the one that set the peak.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def peak_rss_mib() -> float:
    """The process's peak resident set so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


class StageTimes:
    """Accumulates {stage: {"wall_s", "cpu_s", "peak_rss_mib"}}, in the order stages first ran.

    Example:
        >>> times = StageTimes()
        >>> with times.stage("data"):
        ...     dataset = load_dataset("ml-100k")
        >>> times.to_dict()["data"]["wall_s"]
        0.41
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - wall, time.process_time() - cpu)

    def add(self, name: str, wall_s: float, cpu_s: float) -> None:
        row = self.stages.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
        row["wall_s"] += wall_s
        row["cpu_s"] += cpu_s
        row["peak_rss_mib"] = peak_rss_mib()

    def merge(self, prefix: str, rows: dict[str, dict[str, float]] | None) -> None:
        """Add another StageTimes' rows (a training stage's parts) as "<prefix>/<part>"."""
        for part, row in (rows or {}).items():
            self.stages[f"{prefix}/{part}"] = dict(row)

    def by_part(self) -> dict[str, dict[str, float]]:
        """Rows summed by what they are, the text after the last "/" (data, forward_backward, ...);
        peak RSS is the largest of them."""
        out: dict[str, dict[str, float]] = {}
        for name, row in self.stages.items():
            total = out.setdefault(
                name.rsplit("/", 1)[-1], {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0}
            )
            total["wall_s"] += row["wall_s"]
            total["cpu_s"] += row["cpu_s"]
            total["peak_rss_mib"] = max(total["peak_rss_mib"], row.get("peak_rss_mib", 0.0))
        return {name: {k: round(v, 3) for k, v in row.items()} for name, row in out.items()}

    def to_dict(self) -> dict[str, dict[str, float]]:
        return {name: {k: round(v, 3) for k, v in row.items()} for name, row in self.stages.items()}

    def summary(self) -> str:
        """One line per stage, then the totals by part, for the progress log."""
        return "\n".join(
            f"  {name:<36} wall {row['wall_s']:8.1f} s  cpu {row['cpu_s']:8.1f} s  "
            f"peak rss {row['peak_rss_mib']:7.0f} MiB"
            for rows in (self.stages, {f"total {k}": v for k, v in self.by_part().items()})
            for name, row in rows.items()
        )
