"""The serving state behind the HTTP layer: loaded variants, their batchers, the split, reloads.

One `Service` lives on `app.state.service`. The lifespan calls `start()` (load and verify
every variant, off the event loop) and `stop()` (drain batchers, stop the thread pool).
Handlers read `service.variants[name]`, an immutable `Served` pair; a reload builds the new
pair beside the old and swaps the dict entry in one assignment, so a request sees either
the old variant or the new one, never a mix, and the old batcher drains what it holds.

Where a variant's batches run is the model backend's business (`model_backend`): in this
process (the default), in child processes (`model_process`), or in a Ray Serve deployment
(`engine = "ray"`, serving/ray_models.py, imported only then).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from slimrec.artifact import ArtifactError, load_artifact
from slimrec.artifact.index import drop_interrupt_checks, set_search_threads
from slimrec.serving.batcher import Batcher
from slimrec.serving.live_state import LiveState
from slimrec.serving.metrics import Metrics
from slimrec.serving.model_process import ModelProcessError, ModelProcesses
from slimrec.serving.observability import bind_request_ids
from slimrec.serving.queries import Answer, Query, batch_request_ids, run_queries
from slimrec.serving.records import split_record
from slimrec.serving.settings import Settings, validate_split
from slimrec.serving.state import SplitRecord, StateUnavailable
from slimrec.serving.variants import Variant, load_variant

log = logging.getLogger("slimrec.serving")


def freeze_loaded_objects(refreeze: bool = False) -> None:
    """Move everything allocated so far (variants, catalogues, imported modules) out of the GC's sight.

    A full collection walks every tracked object: ~80 ms with one ml-100k variant loaded, and
    about once every 2 s at saturation that stalled every in-flight request (their p99 was that
    pause). Frozen objects are never scanned again. `refreeze` (after a reload has drained the
    old variant) first thaws and collects, so cycles in the replaced variant are freed: one
    pause per reload instead of one every few seconds.
    """
    if refreeze:
        gc.unfreeze()
    gc.collect()
    gc.freeze()


class ReloadError(Exception):
    """A refused reload; `status` is the HTTP status to answer with, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ModelRunner(Protocol):
    """Answers one loaded variant's batches (`run_queries`' contract), wherever the model runs."""

    def run(self, queries: list[Query], n_candidates: int) -> list[Answer]: ...

    def close(self) -> None: ...


class ModelBackend(Protocol):
    """How a variant is loaded for serving and where its batches run.

    `load` is blocking (the service calls it off the event loop) and raises ArtifactError, naming
    the file, for an artifact it refuses; a reload that raises leaves the running variant as it was.
    """

    def load(self, name: str, path: Path) -> tuple[Variant, ModelRunner]: ...


class InProcessRunner:
    """Batches run on the calling (batching) thread, in this process."""

    def __init__(self, variant: Variant):
        self.variant = variant

    def run(self, queries: list[Query], n_candidates: int) -> list[Answer]:
        return run_queries(self.variant, queries, n_candidates)

    def close(self) -> None:
        pass


class InProcessModels:
    """The default backend: the variant is loaded here and its batches run here."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def load(self, name: str, path: Path) -> tuple[Variant, ModelRunner]:
        variant = load_variant(name, path, self.settings.ort_threads, cache_known_users=True)
        return variant, InProcessRunner(variant)


class ChildProcessModels:
    """`model_process`: loaded here (request checks, the popularity fallback) and in child
    processes that run the batches (serving/model_process.py)."""

    def __init__(self, settings: Settings):
        self.settings = settings

    def load(self, name: str, path: Path) -> tuple[Variant, ModelRunner]:
        settings = self.settings
        variant = load_variant(name, path, settings.ort_threads)
        size = settings.batch_threads if settings.batch_max_size > 1 else settings.model_threads
        try:
            processes = ModelProcesses(name, variant.path, size, settings.ort_threads, settings.index_threads)
        except ModelProcessError as exc:
            raise ArtifactError(f"{variant.path}: {exc}") from exc
        return variant, processes


def run_by_depth(
    answer: Callable[[list[Query], int], list[Answer]], queries: list[Query], n_candidates: int
) -> list[Answer]:
    """`answer(queries, n_candidates)`, with requests for more items than the budget run apart, one
    call per such k: a model call ranks max(budget, its largest k) candidates, so a request batched
    with a deeper one would otherwise get another answer than alone. With k <= the budget for
    every request (the default budget 200 is MAX_K): one call, as before.
    """
    depths = {max(query.k, n_candidates) for query in queries}
    if len(depths) == 1:
        return answer(queries, n_candidates)
    answers: list[Answer | None] = [None] * len(queries)
    for depth in sorted(depths):
        rows = [i for i, query in enumerate(queries) if max(query.k, n_candidates) == depth]
        for i, result in zip(rows, answer([queries[i] for i in rows], n_candidates), strict=True):
            answers[i] = result
    return answers  # type: ignore[return-value]


def model_backend(settings: Settings, metrics: Metrics) -> ModelBackend:
    """The backend the settings ask for; Ray is imported only when engine is "ray"."""
    if settings.engine == "ray":
        from slimrec.serving.ray_models import RayModels

        return RayModels(settings, metrics)
    return ChildProcessModels(settings) if settings.model_process else InProcessModels(settings)


@dataclass(frozen=True)
class Served:
    """A loaded variant, the batcher in front of its model, and the runner its batches go to."""

    variant: Variant
    batcher: Batcher[Query, Answer]
    runner: ModelRunner

    async def retire(self) -> None:
        """Answer everything queued or running, then close the runner (model processes stop)."""
        await self.batcher.close()
        await asyncio.to_thread(self.runner.close)


class Service:
    """Variants, split and lifecycle of one server process (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: Metrics, backend: ModelBackend | None = None):
        self.settings, self.metrics = settings, metrics
        self.backend = backend or model_backend(settings, metrics)
        self.split: dict[str, float] = dict(settings.split)
        self.split_version = 0  # 0 until start() has read or stored the split
        self.live = LiveState(settings, metrics)
        self.variants: dict[str, Served] = {}
        self.ready = False
        self._executor = ThreadPoolExecutor(
            settings.model_threads, thread_name_prefix="slimrec-model", initializer=self.init_model_thread
        )
        self._reload_lock = asyncio.Lock()
        self._draining: set[asyncio.Task] = set()
        self._error_logged_at: dict[str, float] = {}  # variant -> last model-error log line
        self._refresh: asyncio.Task | None = None

    async def start(self) -> None:
        """Load every configured variant (in parallel threads); raises ArtifactError naming the file."""
        names = list(self.settings.variants)
        sys.setswitchinterval(self.settings.gil_switch_interval_ms / 1000)
        drop_interrupt_checks()
        if self.settings.inject_delay_ms:
            log.warning(
                "inject_delay_ms=%s: every model call sleeps first (a test hook)",
                self.settings.inject_delay_ms,
            )
        loaded = await asyncio.gather(
            *(asyncio.to_thread(self._load, name, self.settings.variants[name]) for name in names),
            return_exceptions=True,
        )
        failed = [outcome for outcome in loaded if isinstance(outcome, BaseException)]
        ready = [outcome for outcome in loaded if not isinstance(outcome, BaseException)]
        if failed:
            for _, runner in ready:
                runner.close()
            raise failed[0]
        for variant, runner in ready:
            self._install(variant, runner)
            log.info("variant %s: %s (%s) loaded", variant.name, variant.path, variant.version)
        await self.live.open()
        await self._adopt_stored_split()
        # Other processes (workers, replicas) may change the stored split: follow them.
        self._refresh = asyncio.create_task(self._follow_split(), name="slimrec-split-refresh")
        freeze_loaded_objects()
        self.ready = True

    async def stop(self) -> None:
        """Refuse new work, answer everything queued or running, then stop the model processes
        (if any) and the thread pool."""
        self.ready = False
        if self._refresh is not None:
            self._refresh.cancel()
        await asyncio.gather(
            *(served.retire() for served in self.variants.values()), *self._draining, return_exceptions=True
        )
        self._executor.shutdown(wait=True)
        await self.live.close()

    def init_model_thread(self) -> None:
        """Per-thread runtime settings, run first on every thread that makes model calls."""
        set_search_threads(self.settings.index_threads)

    def _load(self, name: str, path) -> tuple[Variant, ModelRunner]:
        """Load and verify a variant, and ready where its batches run (blocking)."""
        return self.backend.load(name, Path(path))

    def _install(self, variant: Variant, runner: ModelRunner) -> Served:
        settings = self.settings
        if settings.n_candidates is not None:  # the operator's budget wins over the artifact's
            variant = replace(variant, n_candidates=settings.n_candidates, n_candidates_from="settings")
        batch_sizes = self.metrics.batch_size.labels(variant.name)
        delay_s = settings.inject_delay_ms / 1000
        answer, n_candidates = runner.run, variant.n_candidates

        def run_batch(queries: list[Query]) -> list[Answer]:
            with bind_request_ids(batch_request_ids(queries)):
                if delay_s:
                    time.sleep(delay_s)  # test hook: slow requests for shutdown and overload tests
                return run_by_depth(answer, queries, n_candidates)

        batcher = Batcher(
            run_batch,
            self._executor,
            settings.batch_max_size,
            settings.batch_wait_s,
            on_batch=batch_sizes.observe,
            name=f"slimrec-batcher-{variant.name}",
            threads=settings.batch_threads,
            thread_init=self.init_model_thread,
        )
        served = Served(variant, batcher, runner)
        self.variants[variant.name] = served  # the atomic swap: one dict assignment on the loop
        self.metrics.record_variant(variant)
        return served

    async def set_split(self, weights: dict[str, float]) -> SplitRecord:
        """Store new A/B weights as the next version and put them in force.

        Raises:
            ValueError: unknown variants, or weights summing to 0.
            StateUnavailable: the shared store cannot be reached (nothing changes).
        """
        record = await self.live.splits.save(validate_split(weights, self.variants))
        self._apply_split(record, "admin")
        return record

    def _apply_split(self, record: SplitRecord, source: str) -> None:
        self.split, self.split_version = dict(record.weights), record.version
        self.metrics.record_split(self.split, record.version)
        self.live.write(split_record(record.version, self.split, source))

    def _for_these_variants(self, stored: SplitRecord) -> SplitRecord:
        """The stored split with its weights checked against the loaded variants (ValueError if
        it names one this server lacks)."""
        return SplitRecord(stored.version, validate_split(stored.weights, self.variants), stored.updated_at)

    async def _adopt_stored_split(self) -> None:
        """A stored split wins over the configured one (it is the latest admin change); the
        configured one is stored as the next version when none is stored or the stored one
        names variants this server does not have. Logs which is in force."""
        stored = await self.live.splits.load()
        if stored is not None:
            try:
                self._apply_split(self._for_these_variants(stored), "stored")
            except ValueError as exc:
                log.warning(
                    "stored split v%d ignored (%s): the configured split is stored instead",
                    stored.version,
                    exc,
                )
            else:
                log.info(
                    "split v%d from %s in force (stored: it wins over the configured %s): %s",
                    stored.version,
                    self.live.where,
                    self.settings.split,
                    self.split,
                )
                return
        record = await self.live.splits.save(self.split)
        self._apply_split(record, "startup")
        log.info(
            "split v%d in force (configured, now stored in %s): %s",
            record.version,
            self.live.where,
            self.split,
        )

    async def _follow_split(self) -> None:
        """Re-read the stored split every state_refresh_s (a state file is shared by the processes of
        one machine, Redis by every process naming it); an unreachable store keeps the last one.
        Each problem is logged once, not once per refresh."""
        unreadable, refused = False, 0  # refused: the last stored version this server cannot apply
        while True:
            await asyncio.sleep(self.settings.state_refresh_s)
            try:
                stored = await self.live.splits.load()
            except (StateUnavailable, ValueError, OSError) as exc:  # ValueError: a corrupt state file
                self.metrics.state_errors.labels("read_split").inc()
                if not unreadable:
                    log.warning("stored split not readable, keeping v%d: %s", self.split_version, exc)
                unreadable = True
                continue
            unreadable = False
            if stored is None or stored.version in (self.split_version, refused):
                continue
            try:
                self._apply_split(self._for_these_variants(stored), "stored")
            except ValueError as exc:
                log.warning("shared split v%d not applied here: %s", stored.version, exc)
                refused = stored.version
                continue
            log.info("split v%d (changed by another process) in force: %s", stored.version, self.split)

    def fallback_order(self, name: str) -> list[str]:
        """The other loaded variants, in name order starting after `name` (who answers if it fails)."""
        names = sorted(self.variants)
        start = names.index(name) + 1 if name in names else 0
        return [n for n in names[start:] + names[:start] if n != name]

    def record_model_error(self, name: str, exc: Exception, log_every_s: float = 10.0) -> None:
        """Count a model failure; log it with its traceback at most once per `log_every_s` per variant."""
        self.metrics.model_errors.labels(name, type(exc).__name__).inc()
        now = time.monotonic()
        if now - self._error_logged_at.get(name, -log_every_s) >= log_every_s:
            self._error_logged_at[name] = now
            log.error(
                "variant %s: model call failed, answering with a fallback (logged at most every "
                "%.0f s; see slimrec_model_errors_total)",
                name,
                log_every_s,
                exc_info=exc,
            )

    def shadow_partner(self, name: str) -> str | None:
        """The variant that shadows `name`: the next one in name order (None with one variant)."""
        names = sorted(self.variants)
        if len(names) < 2:
            return None
        return names[(names.index(name) + 1) % len(names)]

    async def reload(self, name: str, path_text: str, force: bool = False) -> tuple[Variant, Variant]:
        """Load, verify and smoke-test an artifact beside the running one, then swap it in.

        Returns:
            (new variant, previous variant).

        Raises:
            ReloadError: unknown variant (404), path outside the artifacts roots (403), not a
                directory (400), not promotable without force (409), artifact invalid (422).
                The running variant is untouched in every case. Each outcome is counted in
                slimrec_reloads_total: swapped, bad_path, not_promotable, invalid_artifact.
        """
        if name not in self.variants:
            raise ReloadError(404, f"unknown variant {name!r}; loaded: {', '.join(sorted(self.variants))}")
        try:
            path = self.resolve_reload_path(path_text)
        except ReloadError:
            self.metrics.reloads.labels(name, "bad_path").inc()
            raise
        async with self._reload_lock:
            try:
                manifest = (await asyncio.to_thread(load_artifact, path, False)).manifest
                if manifest.get("promotable") is False and not force:
                    raise ReloadError(
                        409,
                        f'{path}: manifest says promotable: false; send {{"force": true}} to load it anyway',
                    )
                variant, runner = await asyncio.to_thread(self._load, name, path)
            except ReloadError:
                self.metrics.reloads.labels(name, "not_promotable").inc()
                raise
            except Exception as exc:  # checksums can pass on a broken model: ORT/FAISS errors count too
                self.metrics.reloads.labels(name, "invalid_artifact").inc()
                reason = str(exc) if isinstance(exc, ArtifactError) else f"{type(exc).__name__}: {exc}"
                log.warning("variant %s: reload from %s refused: %s", name, path, reason)
                raise ReloadError(422, f"artifact refused, still serving the previous one: {reason}") from exc
            previous = self.variants[name]
            variant = self._install(variant, runner).variant  # with the budget in force
            drain = asyncio.create_task(previous.retire())
            self._draining.add(drain)
            drain.add_done_callback(self._draining.discard)
            drain.add_done_callback(lambda _: freeze_loaded_objects(refreeze=True))
        self.metrics.reloads.labels(name, "swapped").inc()
        log.info("variant %s: swapped %s -> %s", name, previous.variant.version, variant.version)
        return variant, previous.variant

    def resolve_reload_path(self, path_text: str) -> Path:
        """An artifact path under one of the artifacts roots (relative paths: under the first root).

        Symlinks and '..' are resolved before the check, so nothing outside the roots loads.
        """
        roots = self.settings.reload_roots
        try:
            candidate = Path(path_text)
            path = (candidate if candidate.is_absolute() else roots[0] / candidate).resolve()
        except (ValueError, OSError) as exc:
            raise ReloadError(400, f"invalid path {path_text!r}: {exc}") from exc
        if not any(path.is_relative_to(root) for root in roots):
            raise ReloadError(
                403,
                f"{path_text!r} is outside the artifacts roots "
                f"({', '.join(map(str, roots))}); set SLIMREC_ARTIFACTS_ROOTS to allow it",
            )
        try:
            is_dir = path.is_dir()
        except OSError as exc:  # e.g. ENAMETOOLONG: is_dir() swallows only "does not exist" errors
            raise ReloadError(400, f"invalid path {path_text[:200]!r}: {exc.strerror}") from exc
        if not is_dir:
            raise ReloadError(400, f"{path} is not a directory")
        return path
