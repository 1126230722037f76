"""Prometheus metrics, labelled by variant and stage, on a registry owned by each app.

A registry per app (not the global default) lets tests and tools build several apps in
one process. With `--workers N` (`PROMETHEUS_MULTIPROC_DIR` set by `slimrec serve`) every
worker writes its samples to files in that directory and any worker's /metrics sums them:
prometheus_client's multiprocess mode. Counters and histograms add up; each gauge says how
workers combine (`multiprocess_mode`: in-flight requests add up, the split is the latest,
per-worker figures carry a `pid` label).
"""

from __future__ import annotations

import asyncio
import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

MODEL_INFO_LABELS = ("version", "path", "artifact_variant", "created_at", "promotable")


def multiprocess() -> bool:
    """Whether this process is one of several writing to PROMETHEUS_MULTIPROC_DIR."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
PROCESS_CPU_EVERY_S = 1.0  # multiprocess mode: how often each process adds its CPU time
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
FRACTION_BUCKETS = tuple(i / 10 for i in range(11))
NO_VARIANT = "none"  # requests refused before a variant was chosen (bad JSON, k out of range, ...)


class ProcessCPU:
    """Multiprocess mode (--workers, Ray replicas): prometheus_client's process collector has no
    multiprocess form, so each process adds its own user + system CPU time to one counter,
    `slimrec_process_cpu_seconds_total`, summed over the processes like any counter (those that
    exited included, so it never goes back)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.counter = Counter(
            "slimrec_process_cpu_seconds",
            "User + system CPU seconds of the server's processes (each adds its own), summed",
            registry=registry,
        )
        self.counted = 0.0

    def count(self) -> None:
        """Add this process's CPU time since the last call (all of it, the first time)."""
        times = os.times()
        used = times.user + times.system
        self.counter.inc(max(0.0, used - self.counted))
        self.counted = used

    async def follow(self) -> None:
        """count() every PROCESS_CPU_EVERY_S, until cancelled."""
        while True:
            self.count()
            await asyncio.sleep(PROCESS_CPU_EVERY_S)


class Metrics:
    """Every metric the server exports; one instance per app, on `app.state.metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._children: dict = {}
        self._model_info_labels: dict[str, tuple[str, ...]] = {}
        r = self.registry
        self.requests = Counter(
            "slimrec_requests_total",
            "API requests by variant, endpoint and status",
            ["variant", "endpoint", "status"],
            registry=r,
        )
        self.errors = Counter(
            "slimrec_request_errors_total",
            "API requests answered 4xx/5xx",
            ["variant", "endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "slimrec_request_latency_seconds",
            "End-to-end handler latency",
            ["variant", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stage_latency = Histogram(
            "slimrec_stage_latency_seconds",
            "Per-request stage latency: queue (waiting for a batch), embed, retrieve, rank "
            "(a batched stage counts once for every request in the batch)",
            ["variant", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "slimrec_batch_size", "Queries per model call", ["variant"], buckets=BATCH_BUCKETS, registry=r
        )
        self.fallbacks = Counter(
            "slimrec_fallback_total",
            "Answers from the popularity fallback",
            ["variant", "reason"],
            registry=r,
        )
        self.ignored_history = Counter(
            "slimrec_ignored_history_items_total",
            "History item ids unknown to the variant",
            ["variant"],
            registry=r,
        )
        self.shadow = Counter(
            "slimrec_shadow_requests_total",
            "Shadow comparisons by outcome",
            ["primary", "shadow", "outcome"],
            registry=r,
        )
        self.shadow_overlap = Histogram(
            "slimrec_shadow_overlap_at_k",
            "|top-k(primary) & top-k(shadow)| / k",
            ["primary", "shadow"],
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.shadow_rbo = Histogram(
            "slimrec_shadow_rbo",
            "Rank-biased overlap (p=0.9, extrapolated) of the two top-k lists",
            ["primary", "shadow"],
            buckets=FRACTION_BUCKETS,
            registry=r,
        )
        self.multiprocess = multiprocess()
        # The server's CPU time, which load tests read from /metrics (loadtest/cpu.py): one process,
        # prometheus_client's process_cpu_seconds_total; several, ProcessCPU's summed counter.
        self.process_cpu = ProcessCPU(r) if self.multiprocess else None
        if self.process_cpu is None:
            ProcessCollector(registry=r)
        self.model_info: Gauge | Info
        if self.multiprocess:  # Info has no multiprocess form: the same sample as a gauge per worker
            self.model_info = Gauge(
                "slimrec_model_info",
                "Loaded artifact per variant",
                ["variant", *MODEL_INFO_LABELS],
                registry=r,
                multiprocess_mode="liveall",
            )
        else:
            self.model_info = Info("slimrec_model", "Loaded artifact per variant", ["variant"], registry=r)
        self.model_bytes = Gauge(
            "slimrec_model_served_bytes",
            "Bytes of the files the server loads",
            ["variant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.split_weight = Gauge(
            "slimrec_split_weight",
            "A/B weight per variant",
            ["variant"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.reloads = Counter(
            "slimrec_reloads_total",
            "Admin reloads by outcome: swapped, invalid_artifact, not_promotable, bad_path",
            ["variant", "outcome"],
            registry=r,
        )
        self.in_flight = Gauge(
            "slimrec_in_flight_requests",
            "Recommendation requests being handled",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.overload = Counter(
            "slimrec_overload_rejections_total",
            "Recommendation requests refused with 503 because max_in_flight were running",
            registry=r,
        )
        self.deadline = Counter(
            "slimrec_deadline_exceeded_total",
            "Recommendation requests answered 504: past request_timeout_ms",
            ["variant"],
            registry=r,
        )
        self.model_errors = Counter(
            "slimrec_model_errors_total",
            "Model calls that raised at run time, by variant and exception type",
            ["variant", "error"],
            registry=r,
        )
        self.runtime_fallbacks = Counter(
            "slimrec_runtime_fallback_total",
            "Requests whose variant failed at run time, by what answered instead (variant:NAME or popular)",
            ["variant", "to"],
            registry=r,
        )

        self.split_version = Gauge(
            "slimrec_split_version",
            "Version of the split in force",
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.events = Counter(
            "slimrec_events_total",
            "Events received by outcome: applied (entered a live history), duplicate (a retried "
            "event_id), unknown_item, not_in_history (a type that does not enter histories), "
            "refused (the state store was unreachable: 503)",
            ["outcome"],
            registry=r,
        )
        self.live_history = Gauge(
            "slimrec_live_history",
            "Live-history store counters (users, evicted_users, ...), per worker",
            ["stat"],
            registry=r,
            multiprocess_mode="liveall",
        )
        self.state_errors = Counter(
            "slimrec_state_errors_total",
            "Operations on the shared state store that failed (Redis unreachable or timing out)",
            ["op"],
            registry=r,
        )
        self.log_written = Counter(
            "slimrec_log_records_written_total", "Exposure, event and split records written", registry=r
        )
        self.log_dropped = Counter(
            "slimrec_log_records_dropped_total",
            "Log records dropped: the writer's queue was full (requests never wait for it) or a write failed",
            registry=r,
        )
        self.log_queue_depth = Gauge(
            "slimrec_log_queue_depth",
            "Records waiting for the log writer (at scrape time)",
            registry=r,
            multiprocess_mode="livesum",
        )

    def record_variant(self, variant) -> None:
        """Export a (re)loaded variant's version, path and size."""
        summary = variant.artifact.summary()
        info = {
            "version": variant.version,
            "path": str(variant.path),
            "artifact_variant": variant.artifact.variant,
            "created_at": str(summary.get("created_at")),
            "promotable": str(summary.get("promotable")),
        }
        if isinstance(self.model_info, Gauge):  # multiprocess mode
            previous = self._model_info_labels.pop(variant.name, None)
            if previous is not None:
                self.model_info.labels(variant.name, *previous).set(0)  # replaced by a reload
            self._model_info_labels[variant.name] = tuple(info[k] for k in MODEL_INFO_LABELS)
            self.model_info.labels(variant.name, *self._model_info_labels[variant.name]).set(1)
        else:
            self.model_info.labels(variant.name).info(info)
        self.model_bytes.labels(variant.name).set(summary["sizes"]["served_bytes"])

    def record_split(self, weights: dict[str, float], version: int) -> None:
        for name, weight in weights.items():
            self.split_weight.labels(name).set(weight)
        self.split_version.set(version)

    def child(self, metric, *labels: str):
        """`metric.labels(*labels)`, looked up once: labels() takes a lock and str()s every value, per
        call, and the request path records several. Only for bounded label values."""
        key = (metric, labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def record_answer(self, variant: str, timings: dict[str, float], fallback: str | None) -> None:
        for stage, seconds in timings.items():
            self.child(self.stage_latency, variant, stage).observe(seconds)
        if fallback:
            self.fallbacks.labels(variant, fallback).inc()

    def exposition(self) -> bytes:
        """The text exposition format for GET /metrics (every worker's, summed, in multiprocess mode)."""
        if not self.multiprocess:
            return generate_latest(self.registry)
        if self.process_cpu is not None:
            self.process_cpu.count()  # the scraped process's own figure is current
        merged = CollectorRegistry()
        MultiProcessCollector(merged)
        return generate_latest(merged)
