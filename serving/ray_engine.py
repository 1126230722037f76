"""`engine = "ray"`: the project's FastAPI app as a Ray Serve application.

    HTTP -> Serve's proxy -> ingress (ingress_replicas) --a batch--> model-<variant> (model_replicas each)
                                \\__ registry: which artifact each variant's replicas hold

The ingress deployment runs `create_app(settings)` unchanged (routes, schemas, errors, headers,
OpenAPI, admission, batching, live state, logs); only its Service's model backend differs
(serving/ray_models.py): each batch goes to the variant's model deployment. Split, overrides
and live histories come from the state store, so more than one ingress replica needs
`state = "redis://..."` (Settings refuses otherwise). A reload received by one ingress replica
is rolled out to the model replicas by it; the other ingress replicas follow the registry's
settled targets within FOLLOW_S.

`build_app(args)` is a Ray Serve application builder: `serve run` / `serve deploy` of the
config that `slimrec serve --engine ray --print-config` writes import it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

from ray import serve
from ray.serve import Application, Deployment
from ray.serve.handle import DeploymentHandle
from slimrec.serving.app import create_app, show_logs
from slimrec.serving.ray_models import REGISTRY, ModelReplica, RayModels, model_deployment
from slimrec.serving.ray_registry import VariantRegistry
from slimrec.serving.service import ReloadError, Service
from slimrec.serving.settings import Settings

log = logging.getLogger("slimrec.serving")

APP_NAME = "slimrec"
INGRESS = "ingress"
IMPORT_PATH = "slimrec.serving.ray_engine:build_app"
FOLLOW_S = 1.0  # how often an ingress replica reads the targets and the model replicas' states
RETRY_FOLLOW_S = 60.0  # a target this replica failed to follow is tried again after this long


@serve.deployment(graceful_shutdown_timeout_s=30)
@serve.ingress()
class Ingress:
    """The FastAPI app of serving/app.py in a Serve replica, built at replica start with the
    registry's targets (a replica started after a reload loads the reloaded artifacts)."""

    def __init__(self, values: dict, registry: DeploymentHandle, models: dict[str, DeploymentHandle]):
        # `models` binds the model deployments into the application; the backend finds them by name.
        self.values, self.registry = values, registry
        self.service: Service | None = None
        self.follower: asyncio.Task | None = None

    async def __serve_build_asgi_app__(self):
        os.makedirs(os.environ["PROMETHEUS_MULTIPROC_DIR"], exist_ok=True)  # on this replica's node
        settings = ingress_settings(self.values, await self.registry.targets.remote())
        show_logs(settings.log_level, settings.log_format)
        app = create_app(settings)
        app.add_middleware(OneRequestIdHeader)
        self.service = app.state.service
        self.follower = asyncio.get_running_loop().create_task(
            follow_targets(self.service), name="slimrec-follow-targets"
        )
        return app

    async def state(self) -> dict:
        """This replica's split and served versions, and its batch retries (asked by broadcast)."""
        service = self.service
        assert service is not None and isinstance(service.backend, RayModels)
        return {
            "replica": serve.get_replica_context().replica_id.unique_id,
            "pid": os.getpid(),
            "ready": service.ready,
            "split": service.split,
            "split_version": service.split_version,
            "model_versions": {name: served.variant.version for name, served in service.variants.items()},
            "retries": dict(service.backend.retry_counts),
        }


class OneRequestIdHeader:
    """Serve's proxy adds X-Request-ID to every response: the request's id, which the app used as
    its request_id too. The app's own header is dropped, so the header is sent once."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_once(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                message["headers"] = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
            await send(message)

        await self.app(scope, receive, send_once)


def ingress_settings(values: dict, targets: dict[str, dict]) -> Settings:
    """An ingress replica's settings: the targets' artifacts, and enough batching threads per
    variant that every replica of its largest model deployment has a batch to work on. The test
    hook inject_delay_ms slows the model calls, which the model replicas make."""
    settings = Settings(**values)
    variants = {
        name: targets.get(name, {}).get("path") or str(path) for name, path in settings.variants.items()
    }
    threads = min(64, settings.batch_threads * max(settings.replicas_of(name) for name in settings.variants))
    return Settings(**{**values, "variants": variants, "batch_threads": threads, "inject_delay_ms": 0})


async def follow_targets(service: Service) -> None:
    """Every FOLLOW_S: load the targets other ingress replicas rolled out, and refresh the model
    replicas' states (GET /v1/variants). Errors are logged (at most every 10 s) and retried."""
    backend = service.backend
    assert isinstance(backend, RayModels)
    failed: dict[str, float] = {}  # target version -> when following it last failed
    warned_at = -10.0
    while True:
        await asyncio.sleep(FOLLOW_S)
        if not service.ready:
            continue
        try:
            targets = await backend.registry.targets.remote()
            for name, target in targets.items():
                await follow(service, backend, name, target, failed)
            await backend.refresh(targets)
        except Exception as exc:  # the registry restarting, a replica dying: next round
            if time.monotonic() - warned_at >= 10:
                warned_at = time.monotonic()
                log.warning("following the variants' targets failed (retrying): %s", exc)


async def follow(service: Service, backend: RayModels, name: str, target: dict, failed: dict) -> None:
    """Serve the variant's settled target if it is not what this replica serves."""
    served = service.variants.get(name)
    if served is None or name in backend.rolling or target["state"] != "ready":
        return
    version = served.variant.version
    if target["version"] is None:  # the registry lost its state: tell it what is served here
        await backend.registry.adopt.remote(name, str(served.variant.path), version)
        return
    if target["version"] == version or time.monotonic() - failed.get(target["version"], -RETRY_FOLLOW_S) < (
        RETRY_FOLLOW_S
    ):
        return
    log.info("variant %s: following the reload to %s (%s)", name, target["path"], target["version"])
    try:
        await service.reload(name, target["path"], force=True)
    except ReloadError as exc:
        failed[target["version"]] = time.monotonic()
        log.warning("variant %s: could not follow the reload to %s: %s", name, target["path"], exc)


def ray_args(settings: Settings) -> dict[str, Any]:
    """The settings as the application's args (JSON values, absolute paths, no admin token: args
    are stored by Ray and printed in configs)."""
    values = settings.model_dump(mode="json", exclude={"config_file", "admin_token"})
    values["engine"] = "ray"
    values["variants"] = {name: str(Path(path).resolve()) for name, path in settings.variants.items()}
    values["artifacts_roots"] = [str(root) for root in settings.reload_roots]  # pinned: reloads move variants
    values["state_dir"] = str(settings.state_dir.resolve())
    if settings.log_dir is not None:
        values["log_dir"] = str(settings.log_dir.resolve())
    return values


def new_metrics_dir() -> Path:
    """A directory name no earlier deployment used (multiprocess mode sums every file in it)."""
    return Path(tempfile.gettempdir()) / f"slimrec-metrics-{uuid.uuid4().hex[:12]}"


def build_application(settings: Settings, metrics_dir: Path | None = None) -> Application:
    """The Serve application: registry, one model deployment per variant, the ingress.

    The admin token, if set, reaches the ingress replicas through their runtime_env (never the
    args). Fractional `num_cpus` (0.25 by default) lets an ingress and three model replicas share
    2 CPUs: the model threads run ONNX Runtime and FAISS whatever Ray reserved.
    """
    values = ray_args(settings)
    # Serve's access log: the ingress's requests at info (uvicorn's access log); never internal calls.
    level = settings.log_level.upper()
    quiet = {"log_level": level, "enable_access_log": False}
    registry = (
        deployment(VariantRegistry).options(name=REGISTRY, logging_config=quiet).bind(values["variants"])
    )
    # Every replica of a node writes its samples under one directory (prometheus_client's
    # multiprocess mode, as uvicorn's workers do): any ingress replica's /metrics shows the
    # node's, model replicas' CPU time included.
    metrics_env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir or new_metrics_dir())}
    model = deployment(ModelReplica)
    models = {
        name: model.options(
            name=model_deployment(name),
            **replica_options(settings, name),
            ray_actor_options={"num_cpus": settings.model_num_cpus, "runtime_env": {"env_vars": metrics_env}},
            # a few batches per replica: more waiting at one replica is better spent at another
            max_ongoing_requests=max(2, 2 * settings.batch_threads),
            logging_config=quiet,
        ).bind(name, values, registry)
        for name in settings.variants
    }
    env = dict(metrics_env)
    if settings.admin_token is not None:
        env["SLIMREC_ADMIN_TOKEN"] = settings.admin_token.get_secret_value()
    actor_options: dict[str, Any] = {"num_cpus": settings.ingress_num_cpus, "runtime_env": {"env_vars": env}}
    ingress = deployment(Ingress).options(
        name=INGRESS,
        **replica_options(settings, None),
        ray_actor_options=actor_options,
        # the app's own admission (max_in_flight, then 503) decides, not a queue in front of it
        max_ongoing_requests=settings.max_in_flight + 32,
        logging_config={
            "log_level": level,
            "enable_access_log": settings.access_log and level in ("INFO", "DEBUG"),
        },
    )
    return ingress.bind(values, registry, models)


def replica_options(settings: Settings, variant: str | None) -> dict[str, Any]:
    """A fixed `num_replicas`, or Ray Serve's `autoscaling_config` (between the replica count
    and the max replicas setting) for a variant's model deployment (None: the ingress)."""
    autoscaling = settings.autoscaling_of(variant)
    if autoscaling is not None:
        return {"autoscaling_config": autoscaling}
    return {"num_replicas": settings.replicas_of(variant) if variant else settings.ingress_replicas}


def deployment(cls: type) -> Deployment:
    """A class `@serve.deployment` made a Deployment (mypy applies no class decorator)."""
    return cast(Deployment, cls)


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve application builder (`import_path: slimrec.serving.ray_engine:build_app`): the
    args are settings (as `--print-config` writes them, or any subset, e.g. from `serve run
    slimrec.serving.ray_engine:build_app variants=full=artifacts/teacher`)."""
    return build_application(Settings(**{**args, "engine": "ray"}))


def serve_config(settings: Settings) -> dict[str, Any]:
    """A Serve config (the schema of `serve deploy` / `serve run config.yaml`) for these settings."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": settings.host, "port": settings.port},
        "applications": [
            {"name": APP_NAME, "route_prefix": "/", "import_path": IMPORT_PATH, "args": ray_args(settings)}
        ],
    }
