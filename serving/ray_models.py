"""A variant's batches in a Ray Serve deployment (`engine = "ray"`): the model replicas, and the
ingress's side of them (the model backend serving/service.py picks for that engine).

Batching: the ingress's own Batcher (serving/batcher.py) forms the batches exactly as the
embedded server does, and one Ray call carries a whole batch to a model replica, which runs
`run_queries` on it. So the answers equal the embedded server's, and Ray's per-call cost
(routing, pickling, a round trip) is paid once per batch, not once per request.

Versions: every batch names the model version its queries were built against (with that
version's catalogue, at the ingress). A model replica answers with exactly that version or
raises VersionUnavailable: an answer never mixes versions. The ingress retries a batch once
(on another replica: a dead replica is dropped from Ray's routing, and recommendations are
idempotent) when its replica died under it or lacked the version; retries are counted in
`slimrec_model_retries_total{variant,reason}`.

A reload is rolled to every replica of the variant: the ingress has validated the artifact
itself first (checksums, signatures, smoke query: `load_variant`), records it as the variant's
target (serving/ray_registry.py), then broadcasts `prepare(path, version)` to every replica
(Ray's `DeploymentHandle.broadcast`); each loads it beside the version it serves. If any
replica refuses it, the previous target is restored and the new version discarded everywhere,
so every replica stays on the old one and the reload answers 422; otherwise the ingress swaps.
A replica keeps the previous version for a while (`retire_after_s`) for batches in flight and
for ingress replicas that have not followed yet.

Memory: the ingress loads each variant whole (catalogue, tables, ONNX sessions, FAISS index):
it validates reloads itself and answers the popularity fallback; each model replica holds the
variant once more (twice for `retire_after_s` after a roll).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import ray
from prometheus_client import Counter
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from slimrec.artifact import ArtifactError
from slimrec.artifact.index import drop_interrupt_checks, set_search_threads
from slimrec.serving.metrics import Metrics, ProcessCPU, multiprocess
from slimrec.serving.observability import bind_request_ids, configure_logging
from slimrec.serving.queries import Answer, Query, batch_request_ids, run_queries
from slimrec.serving.ray_registry import RollRefused
from slimrec.serving.settings import Settings
from slimrec.serving.variants import Variant, load_variant

log = logging.getLogger("slimrec.serving")

REGISTRY = "registry"  # deployment names inside the application
CALL_TIMEOUT_S = 120.0  # a batch taking longer means a hung replica: fail it (requests fall back)
PREPARE_TIMEOUT_S = 300.0  # a replica loads and verifies an artifact: seconds, minutes at 1M items
READY_TIMEOUT_S = 300.0  # at startup: until a model replica holds the variant


def model_deployment(variant: str) -> str:
    """The name of a variant's model deployment."""
    return f"model-{variant}"


class VersionUnavailable(RuntimeError):
    """A batch named a model version this replica does not hold (it started after a roll, or the
    version was retired); the ingress retries the batch once."""


def cause_of(exc: BaseException) -> BaseException:
    """The exception raised in the replica, out of Ray's RayTaskError wrapper."""
    return getattr(exc, "cause", None) or exc


@serve.deployment(max_ongoing_requests=8, graceful_shutdown_timeout_s=30)
class ModelReplica:
    """One replica of a variant's model deployment: loads the registry's target, answers batches
    with the version they name, loads a rolled-out version beside the served one (`prepare`)."""

    async def __init__(self, name: str, values: dict, registry: DeploymentHandle):  # type: ignore[misc]
        # async: it awaits the registry (a blocking call would sit on the replica's event loop)
        settings = Settings(**values)
        configure_logging(settings.log_format, settings.log_level)
        self.name, self.settings = name, settings
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.versions: dict[str, Variant] = {}  # model version -> loaded variant
        self.current = ""
        self.loading: str | None = None
        self._batches_started: list[float] = []  # monotonic starts of the batches being answered
        self.retire_after_s = max(60.0, 3 * settings.request_timeout_ms / 1000)
        self._retiring: dict[str, asyncio.TimerHandle] = {}
        self._discarded: set[str] = set()
        self._load_lock = asyncio.Lock()
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        drop_interrupt_checks()
        self._executor = ThreadPoolExecutor(
            settings.batch_threads,
            thread_name_prefix=f"slimrec-model-{name}",
            initializer=set_search_threads,
            initargs=(settings.index_threads,),
        )
        # Its CPU time joins the ingress replicas' in /metrics (slimrec_process_cpu_seconds_total).
        self._cpu = None
        if multiprocess():
            os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)  # on this replica's node
            self._cpu = asyncio.get_running_loop().create_task(ProcessCPU().follow())
        target = (await registry.targets.remote())[name]
        await self.prepare(target["path"], target["version"])
        log.info("model replica %s of %s: %s (%s) loaded", self.replica, name, target["path"], self.current)

    async def run(self, queries: list[Query], n_candidates: int, version: str) -> list[Answer]:
        """`run_queries` on the version the batch names (on this replica's model threads)."""
        variant = self.versions.get(version)
        if variant is None:
            raise VersionUnavailable(
                f"model replica {self.replica} of {self.name} holds {sorted(self.versions)}, not {version}"
            )
        delay_s = self.settings.inject_delay_ms / 1000

        def answer() -> list[Answer]:
            with bind_request_ids(batch_request_ids(queries)):  # this replica's lines name the requests
                started = time.perf_counter()
                if delay_s:
                    time.sleep(delay_s)  # test hook: a slow model (the ingress does not sleep under Ray)
                try:
                    answers = run_queries(variant, queries, n_candidates)
                except Exception:
                    log.exception(
                        "model replica %s of %s: a batch of %d failed", self.replica, self.name, len(queries)
                    )
                    raise
                log.debug(
                    "model replica %s of %s: a batch of %d answered by %s in %.1f ms",
                    *(self.replica, self.name, len(queries), version, 1000 * (time.perf_counter() - started)),
                )
                return answers

        started = time.monotonic()
        self._batches_started.append(started)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, answer)
        finally:
            self._batches_started.remove(started)

    async def prepare(self, path: str, version: str | None = None) -> dict:
        """Hold `version` (loaded from `path` unless held) and serve it; the others retire later.

        Raises:
            ArtifactError: the artifact fails to load here, or is not `version` here (its files
                changed since the ingress validated it, or differ on this node).
        """
        if version is not None:
            self._discarded.discard(version)
        async with self._load_lock:
            if version is None or version not in self.versions:
                self.loading = version or path
                try:
                    variant = await asyncio.to_thread(
                        load_variant, self.name, path, self.settings.ort_threads, cache_known_users=True
                    )
                finally:
                    self.loading = None
                if version is not None and variant.version != version:
                    raise ArtifactError(
                        f"{path}: model replica {self.replica} loaded {variant.version}, the ingress "
                        f"validated {version} (the files changed in between, or differ on this node)"
                    )
                version = variant.version
                if version in self._discarded:  # the roll was abandoned while this replica loaded
                    return self.report()
                self.versions[version] = variant
            self._serve(version)
        return self.report()

    async def discard(self, version: str, restore: str) -> dict:
        """Undo a refused roll: drop `version`, serve `restore` again (if still held)."""
        self._discarded.add(version)
        if version in self.versions and restore in self.versions:
            self._serve(restore)
            self._forget(version)
        return self.report()

    async def state(self) -> dict:
        """What /v1/variants shows for this replica (asked by broadcast)."""
        return self.report()

    def report(self) -> dict:
        return {
            "replica": self.replica,
            "pid": os.getpid(),
            "node": ray.util.get_node_ip_address(),
            "model_version": self.current,
            "versions": sorted(self.versions),
            "loading": self.loading,
            "running": len(self._batches_started),
            # how long ago the newest running batch started (None: none running); the fault test
            # kills a replica only while a batch has long left to run
            "newest_batch_ms": (
                1000 * (time.monotonic() - max(self._batches_started)) if self._batches_started else None
            ),
        }

    def _serve(self, version: str) -> None:
        """`version` becomes the served one; every other held version retires in retire_after_s."""
        self.current = version
        timer = self._retiring.pop(version, None)
        if timer is not None:
            timer.cancel()
        loop = asyncio.get_running_loop()
        for held in self.versions:
            if held != version and held not in self._retiring:
                self._retiring[held] = loop.call_later(self.retire_after_s, self._forget, held)

    def _forget(self, version: str) -> None:
        timer = self._retiring.pop(version, None)
        if timer is not None:
            timer.cancel()
        if version != self.current:
            self.versions.pop(version, None)


@dataclass
class ReplicatedVariant(Variant):
    """A variant whose batches run in a model deployment: `describe()` adds its replicas (each
    replica's served and held versions), which `GET /v1/variants` shows."""

    replicas: Callable[[], list[dict]] = field(default=list, repr=False, compare=False)

    def describe(self) -> dict:
        return {**super().describe(), "replicas": self.replicas()}


class RayRunner:
    """A ModelRunner sending a variant's batches, for one model version, to its deployment."""

    def __init__(self, handle: DeploymentHandle, name: str, version: str, on_retry: Callable):
        self.handle, self.name, self.version, self.on_retry = handle, name, version, on_retry

    def run(self, queries: list[Query], n_candidates: int) -> list[Answer]:
        try:
            return self._call(queries, n_candidates)
        except Exception as exc:
            if not isinstance(exc, RayActorError) and not isinstance(cause_of(exc), VersionUnavailable):
                raise
            self.on_retry(self.name, exc)  # the replica died or lacks the version: another one, once
            return self._call(queries, n_candidates)

    def _call(self, queries: list[Query], n_candidates: int) -> list[Answer]:
        response = self.handle.run.remote(queries, n_candidates, self.version)
        return response.result(timeout_s=CALL_TIMEOUT_S)

    def close(self) -> None:
        pass  # the replicas retire a version on their own, retire_after_s after a roll


class RayModels:
    """The model backend of an ingress replica: variants loaded here (validation, catalogue,
    the fallback) and rolled out to their model deployments; batches sent there.

    Lives inside a Serve replica of the application (it finds the deployments by name).
    """

    def __init__(self, settings: Settings, metrics: Metrics):
        context = serve.get_replica_context()
        self.settings, self.replica = settings, context.replica_id.unique_id
        self.registry = serve.get_deployment_handle(REGISTRY, context.app_name)
        self.models = {
            name: serve.get_deployment_handle(model_deployment(name), context.app_name)
            for name in settings.variants
        }
        self.retries = Counter(
            "slimrec_model_retries_total",
            "Batches sent again because their model replica died or lacked the model version",
            ["variant", "reason"],
            registry=metrics.registry,
        )
        self.serving: dict[str, str] = {}  # variant -> version this ingress replica serves
        self.rolling: set[str] = set()  # variants this ingress replica is rolling out now
        self.replica_rows: dict[str, list[dict]] = {}  # variant -> replica states (refreshed)
        self.retry_counts: dict[str, int] = {}  # variant -> batches sent again (the metric, readable)

    def load(self, name: str, path: Path) -> tuple[Variant, RayRunner]:
        """Load and validate the artifact here, then make every model replica hold it (blocking).

        The first load of a variant joins the replicas (they load the registry's target
        themselves); later ones roll the artifact out (module docstring).

        Raises:
            ArtifactError: the artifact is refused here or by a model replica (every replica
                stays on the version it served), or a model replica never came up.
        """
        variant = load_variant(name, path, self.settings.ort_threads)
        if name in self.serving:
            self._roll(variant)
        else:
            self._join(variant)
        self.serving[name] = variant.version
        replicated = ReplicatedVariant(
            **{f.name: getattr(variant, f.name) for f in fields(Variant)},
            replicas=lambda: self.replica_rows.get(name, []),
        )
        return replicated, RayRunner(self.models[name], name, variant.version, self.count_retry)

    def count_retry(self, name: str, exc: BaseException) -> None:
        reason = type(cause_of(exc)).__name__
        self.retries.labels(name, reason).inc()
        self.retry_counts[name] = self.retry_counts.get(name, 0) + 1
        log.warning("variant %s: batch sent again (%s): %s", name, reason, str(exc).splitlines()[0][:200])

    def _join(self, variant: Variant) -> None:
        """Startup: the registry's target must be this artifact; wait until a replica holds it."""
        name, path = variant.name, str(variant.path)
        target = self.registry.adopt.remote(name, path, variant.version).result(timeout_s=60)
        if (target["path"], target["version"]) != (path, variant.version):
            raise ArtifactError(
                f"variant {name}: the registry's target is {target['path']} ({target['version']}), this "
                f"replica loaded {path} ({variant.version}): a reload happened while it started"
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            held, refused = self._prepare(variant, timeout_s=max(1.0, min(30.0, deadline - time.monotonic())))
            if refused:
                raise ArtifactError(f"variant {name}: {refused[0]}")
            if held:
                return
            if time.monotonic() > deadline:
                raise ArtifactError(
                    f"variant {name}: no model replica held {path} after {READY_TIMEOUT_S:.0f} s"
                )
            time.sleep(0.5)

    def _roll(self, variant: Variant) -> None:
        """Reload: make the artifact the target, have every replica load it, settle or undo."""
        name, path, version = variant.name, str(variant.path), variant.version
        target = self.registry.targets.remote().result(timeout_s=60)[name]
        if (target["path"], target["version"], target["state"]) == (path, version, "ready"):
            # Already the target (another ingress replica rolled it): make sure every replica has it.
            held, refused = self._prepare(variant, PREPARE_TIMEOUT_S)
            if refused or not held:
                raise ArtifactError(f"variant {name}: {(refused or ['no model replica answered'])[0]}")
            return
        try:
            previous = self.registry.claim.remote(name, path, version, self.replica).result(timeout_s=60)
        except Exception as exc:
            if isinstance(cause_of(exc), RollRefused):
                raise RollRefused(str(cause_of(exc))) from None
            raise
        self.rolling.add(name)
        try:
            held, refused = self._prepare(variant, PREPARE_TIMEOUT_S)
            rolled = bool(held) and not refused
            self.registry.settle.remote(name, self.replica, rolled).result(timeout_s=60)
            if not rolled:
                self._broadcast(name, "discard", version, previous["version"], timeout_s=60)
                why = (refused or ["no model replica answered"])[0]
                raise ArtifactError(
                    f"variant {name}: {why}; every model replica stays on {previous['version']}"
                )
        finally:
            self.rolling.discard(name)

    def _prepare(self, variant: Variant, timeout_s: float) -> tuple[list[dict], list[str]]:
        """Broadcast prepare(path, version): (the replicas holding it, why others refused it).

        A replica that died meanwhile is neither: its replacement loads the registry's target.
        """
        outcomes = self._broadcast(
            variant.name, "prepare", str(variant.path), variant.version, timeout_s=timeout_s
        )
        held = [o for o in outcomes if isinstance(o, dict)]
        refused = [
            f"{type(cause_of(o)).__name__}: {cause_of(o)}"
            for o in outcomes
            if isinstance(o, BaseException) and not isinstance(o, RayActorError)
        ]
        return held, refused

    def _broadcast(self, name: str, method: str, *args, timeout_s: float) -> list:
        """Outcomes of `method(*args)` on every running replica of the variant ([] when none runs yet)."""
        try:
            response = self.models[name].broadcast(method, *args)
            return response.results(timeout_s=timeout_s, return_exceptions=True)
        except (DeploymentUnavailableError, TimeoutError):
            return []

    async def refresh(self, targets: dict[str, dict]) -> None:
        """Ask every model replica its state (for /v1/variants); ask replicas lacking the target
        version to load it (one that started during a roll that was undone)."""
        for name, handle in self.models.items():
            try:
                outcomes = await handle.broadcast("state").results_async(timeout_s=10, return_exceptions=True)
            except (DeploymentUnavailableError, TimeoutError):
                continue
            rows = [o for o in outcomes if isinstance(o, dict)]
            self.replica_rows[name] = sorted(rows, key=lambda row: row["replica"])
            version, target = self.serving.get(name), targets.get(name, {})
            if version is None or name in self.rolling or target.get("version") != version:
                continue
            if any(version not in row["versions"] and not row["loading"] for row in rows):
                await handle.broadcast("prepare", target["path"], version).results_async(
                    timeout_s=PREPARE_TIMEOUT_S, return_exceptions=True
                )
