"""Offline timing of served models: per-stage latency, interleaved across variants, and resident memory.

`time_variants` calls `ServedModel.recommend` in this process (no HTTP) for every
(threads, batch) setting, request by request, alternating which variant goes first so
that machine noise (this host is shared) hits every variant alike. `resident_memory`
loads one variant in a fresh interpreter and reports its RSS growth.

Stages are the ones `recommend` times: embed (user tower), retrieve (index top-N minus
the user's seen items), rank (ranker + blend + top-k sort). `total` is the wall time of
the whole request as a server would run it: assembling the user's state
(`known_users`) plus `recommend`, so it is a little more than the sum of the stages.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np
from slimrec.artifact import Artifact
from slimrec.artifact.runtime import ServedModel

STAGES = ("embed", "retrieve", "rank", "total")


def all_cpus() -> int:
    """CPUs this process may run on (the container's share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class TimingConfig:
    """What `time_variants` measures.

    Args:
        repeats: timed requests per variant at batch 1 (>= 200 for a stable p99).
        batch_repeats: timed requests per variant at larger batches.
        batches: users per request.
        threads: ORT intra-op threads and FAISS OpenMP threads; 0 means all CPUs.
        warmup: untimed requests per variant and setting before timing starts.
        k, n_candidates: as `ServedModel.recommend` (top-k of the ranker over n_candidates).
    """

    repeats: int = 300
    batch_repeats: int = 60
    batches: tuple[int, ...] = (1, 32)
    threads: tuple[int, ...] = (1, 0)
    warmup: int = 20
    k: int = 10
    n_candidates: int = 200
    seed: int = 0

    def __post_init__(self):
        self.batches, self.threads = tuple(self.batches), tuple(self.threads)
        if self.repeats < 1 or self.batch_repeats < 1 or self.warmup < 0:
            raise ValueError(f"repeats and batch_repeats must be >= 1, warmup >= 0: {self}")
        if not self.batches or min(self.batches) < 1:
            raise ValueError(f"batches must be positive sizes, got {self.batches}")
        if not self.threads or min(self.threads) < 0:
            raise ValueError(f"threads must be >= 0 (0 = all CPUs), got {self.threads}")

    def resolved_threads(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(t or all_cpus() for t in self.threads))

    def to_dict(self) -> dict:
        return {**asdict(self), "threads": list(self.resolved_threads())}


@dataclass
class LatencySamples:
    """Seconds per request of one variant in one (batch, threads) setting."""

    variant: str
    batch: int
    threads: int
    seconds: dict[str, list[float]] = field(default_factory=lambda: {s: [] for s in STAGES})

    def summary(self) -> dict:
        stats = {}
        for stage, values in self.seconds.items():
            ms = np.asarray(values) * 1e3
            stats[stage] = {
                "median_ms": float(np.median(ms)),
                "p99_ms": float(np.percentile(ms, 99)),
                "mean_ms": float(ms.mean()),
            }
        return {
            "variant": self.variant,
            "batch": self.batch,
            "threads": self.threads,
            "requests": len(self.seconds["total"]),
            "stages": stats,
        }


def request_users(model: ServedModel, n_requests: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """[n_requests, batch] user indices drawn from users with fitted interactions (they have a history)."""
    known = np.flatnonzero(np.diff(model.fitted_indptr) > 0)
    if len(known) == 0:
        raise ValueError(f"{model.artifact.path}: no user has fitted interactions to request for")
    return rng.choice(known, size=(n_requests, batch))


def time_variants(artifacts: dict[str, Artifact], config: TimingConfig, progress=None) -> list[dict]:
    """Latency summaries (see `LatencySamples.summary`) for every variant x threads x batch.

    Every variant answers the same users in each setting; per request the order of the
    variants alternates. `progress(message)` is called once per setting.
    """
    check_same_data(artifacts)
    rng = np.random.default_rng(config.seed)
    out = []
    for threads in config.resolved_threads():
        faiss.omp_set_num_threads(threads)
        models = {name: ServedModel(art, threads=threads) for name, art in artifacts.items()}
        first = next(iter(models.values()))
        for batch in config.batches:
            if progress:
                progress(f"timing batch {batch}, {threads} thread(s)")
            repeats = config.repeats if batch == 1 else config.batch_repeats
            users = request_users(first, config.warmup + repeats, batch, rng)
            samples = {name: LatencySamples(name, batch, threads) for name in models}
            names = list(models)
            for i, request in enumerate(users):
                for name in names if i % 2 == 0 else names[::-1]:
                    _time_one(models[name], request, config, samples[name] if i >= config.warmup else None)
            out.extend(s.summary() for s in samples.values())
        del models
    faiss.omp_set_num_threads(all_cpus())
    return out


def check_same_data(artifacts: dict[str, Artifact]) -> None:
    """Variants compared request by request must serve the same users and items."""
    seen = {
        name: (
            art.config["feature_space"]["n_users"],
            art.config["feature_space"]["n_items"],
            art.manifest["data"].get("fingerprint"),
        )
        for name, art in artifacts.items()
    }
    if len(set(seen.values())) > 1:
        detail = ", ".join(
            f"{name}: {u:,} users, {i:,} items, data {str(f)[:12]}" for name, (u, i, f) in seen.items()
        )
        raise ValueError(
            f"the variants were trained on different data ({detail}); bench compares models of one dataset"
        )


def _time_one(
    model: ServedModel, users: np.ndarray, config: TimingConfig, into: LatencySamples | None
) -> None:
    t0 = time.perf_counter()
    rec = model.recommend(model.known_users(users), k=config.k, n_candidates=config.n_candidates)
    total = time.perf_counter() - t0
    if into is not None:
        into.seconds["total"].append(total)
        for stage, seconds in rec.timings.items():
            into.seconds[stage].append(seconds)


def ratios(latency: list[dict], numerator: str = "compressed", denominator: str = "full") -> list[dict]:
    """numerator / denominator of median and p99 per stage, for each (batch, threads) setting."""
    by_key = {(r["variant"], r["batch"], r["threads"]): r for r in latency}
    out = []
    for (variant, batch, threads), row in by_key.items():
        if variant != denominator or (numerator, batch, threads) not in by_key:
            continue
        top = by_key[(numerator, batch, threads)]["stages"]
        out.append(
            {
                "batch": batch,
                "threads": threads,
                "stages": {
                    stage: {
                        q: top[stage][f"{q}_ms"] / row["stages"][stage][f"{q}_ms"] for q in ("median", "p99")
                    }
                    for stage in row["stages"]
                },
            }
        )
    return out


_MEMORY_PROBE = """
import gc, json, sys, time
import psutil
from slimrec.artifact import load_artifact
from slimrec.artifact.runtime import ServedModel
art = load_artifact(sys.argv[1])
gc.collect()
proc = psutil.Process()
before = proc.memory_info().rss
t0 = time.perf_counter()
model = ServedModel(art, threads=1)
seconds = time.perf_counter() - t0
gc.collect()
after = proc.memory_info().rss
print(json.dumps({"rss_before_bytes": before, "rss_after_bytes": after, "resident_bytes": after - before,
                  "load_seconds": seconds}))
"""


def resident_memory(path, timeout_s: float = 600) -> dict:
    """RSS growth of a fresh interpreter while it builds `ServedModel(artifact)` (imports excluded).

    Returns {"resident_bytes", "rss_before_bytes", "rss_after_bytes", "load_seconds"}.
    """
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE, str(path)], capture_output=True, text=True, timeout=timeout_s
    )
    if result.returncode != 0:
        tail = result.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"loading {path} in a fresh process failed: {tail[0]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    import onnxruntime

    return {
        "cpu": cpu,
        "cpus": all_cpus(),
        "loadavg": list(os.getloadavg()),
        "versions": {
            "onnxruntime": onnxruntime.__version__,
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
    }
