"""The FastAPI app: `create_app(settings)` builds it; its lifespan loads the variants.

    uvicorn --factory serving.app:create_app_from_env     # settings from SLIMREC_* env
    slimrec serve --variant full=artifacts/teacher ...    # the CLI wraps the same factory

No CORS middleware on purpose: browsers on other origins get no access. Bodies over
`max_body_bytes` are refused with 413 before any parsing, bodies nested too deeply to parse
with 422; past `max_in_flight` recommendation requests the answer is 503 + Retry-After
(`serving/limits.py`).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from contextlib import asynccontextmanager, contextmanager, suppress

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from slimrec.artifact import ArtifactError
from slimrec.serving import admin, api, events, observability
from slimrec.serving.direct import DirectDispatch
from slimrec.serving.limits import AdmissionMiddleware, json_too_deep, send_json_error
from slimrec.serving.metrics import NO_VARIANT, Metrics
from slimrec.serving.service import Service
from slimrec.serving.settings import Settings

log = logging.getLogger("slimrec.serving")


def create_app(settings: Settings) -> FastAPI:
    """Build the app for `settings`; nothing loads until the lifespan starts.

    Example:
        >>> app = create_app(Settings(variants={"full": "artifacts/teacher"}))
        >>> with TestClient(app) as client:  # runs the lifespan: loads and verifies
        ...     client.get("/readyz").json()["status"]
        'ready'
    """
    metrics = Metrics()
    service = Service(settings, metrics)
    telemetry = observability.Telemetry(settings.log_format, settings.tracing)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        telemetry.start()  # before the variants load: a bad OTEL_* setting fails in a second
        try:
            await service.start()
        except Exception as exc:
            if isinstance(exc, ArtifactError):  # one line naming the file, before uvicorn's traceback
                log.error("cannot serve: %s", exc)
            telemetry.stop()
            raise
        cpu = asyncio.create_task(metrics.process_cpu.follow()) if metrics.process_cpu else None
        yield
        if cpu is not None:
            cpu.cancel()
        await service.stop()  # uvicorn has finished in-flight requests; drain batchers and shadows
        telemetry.stop()  # export the last spans

    app = FastAPI(title="slimrec", version="1", lifespan=lifespan)
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    app.state.telemetry = telemetry
    app.include_router(api.router)
    app.include_router(events.router)
    app.include_router(admin.router)
    # Starlette types handlers as taking any Exception; this one is registered for its own class.
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    # The last added runs first: instrumentation -> body limit -> admission -> the direct
    # recommendation routes -> FastAPI's router, so 413s and overload 503s are counted (and
    # logged and traced), and a refused request has had its (bounded) body read, which keeps
    # its connection usable.
    app.add_middleware(DirectDispatch, routes=api.DIRECT_ROUTES)
    app.add_middleware(
        AdmissionMiddleware,
        limit=settings.max_in_flight,
        timeout_s=settings.request_timeout_ms / 1000,
        retry_after_s=settings.retry_after_s,
        metrics=metrics,
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=settings.max_body_bytes,
        per_path={events.PATH: settings.max_events_body_bytes},  # batches of events are larger
    )
    app.add_middleware(InstrumentMiddleware, metrics=metrics, telemetry=telemetry)
    return app


def create_app_from_env() -> FastAPI:
    """uvicorn factory: Settings from the environment (what `slimrec serve` hands its workers)."""
    settings = Settings()
    show_logs(settings.log_level, settings.log_format)
    return create_app(settings)


def show_logs(level: str, log_format: observability.LogFormat = "text") -> None:
    """The server's own log lines (variants loaded, the split in force, faults) beside uvicorn's,
    at the same level; without a handler Python would print only warnings and above. JSON: every
    logger's lines as JSON lines (serving/observability.py)."""
    observability.configure_logging(log_format, level)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server whose orderly stop exits 0: no re-raised SIGTERM after the graceful shutdown.

    uvicorn re-raises the signal once it has drained, so the process ends "killed by SIGTERM"
    (status -15) even when every in-flight request was answered. Here SIGTERM/SIGINT only ask
    uvicorn to shut down (stop accepting, finish in-flight requests, lifespan shutdown).
    """

    @contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in uvicorn.server.HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one readable line (and the details); malformed JSON is a 400."""
    errors = exc.errors()
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "invalid JSON")
            return JSONResponse(
                {"detail": f"malformed JSON body: {reason} at character {error['loc'][-1]}"}, status_code=400
            )
    if any(e.get("type") == "model_attributes_type" and tuple(e["loc"]) == ("body",) for e in errors):
        return JSONResponse(
            {"detail": "request body must be a JSON object sent with Content-Type: application/json"},
            status_code=422,
        )
    parts = []
    for error in errors[:10]:
        where = ".".join(str(p) for p in error["loc"] if p not in ("body", "query", "path", "header"))
        parts.append(f"{where}: {error['msg']}" if where else error["msg"])
    details = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:10]]
    return JSONResponse({"detail": "; ".join(parts), "errors": details}, status_code=422)


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413 (Content-Length checked, chunked bodies counted),
    and bodies nested too deeply to parse with 422."""

    # Before a 413 the rest of the body is read and dropped (at most this much, this long): closing
    # with unread data makes the kernel reset the connection, and the client sees a broken pipe
    # instead of the 413 (nginx's "lingering close").
    DRAIN_BYTES = 16 * 1024 * 1024
    DRAIN_SECONDS = 2.0

    def __init__(self, app, max_bytes: int, per_path: dict[str, int] | None = None):
        self.app, self.max_bytes, self.per_path = app, max_bytes, per_path or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        max_bytes = self.per_path.get(scope["path"], self.max_bytes)
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            # With "Expect: 100-continue" the client waits for our go-ahead: nothing to drain.
            drain = length.isdigit() and b"expect" not in headers
            return await self._refuse(receive, send, drain, max_bytes)
        chunks, size = [], 0
        while True:  # bodies are small by construction: buffer, then replay to the app
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away before sending the body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > max_bytes:
                return await self._refuse(receive, send, message.get("more_body", False), max_bytes)
            if not message.get("more_body", False):
                break
        if json_too_deep(b"".join(chunks)):
            return await send_json_error(
                send,
                422,
                "request body is JSON nested too deeply (requests nest 2 levels: object, list, string)",
            )
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, receive, send, drain: bool, max_bytes: int):
        if drain:
            drained = 0
            with suppress(TimeoutError):
                async with asyncio.timeout(self.DRAIN_SECONDS):
                    while drained < self.DRAIN_BYTES:
                        message = await receive()
                        drained += len(message.get("body", b""))
                        if message["type"] != "http.request" or not message.get("more_body", False):
                            break
        await send_json_error(send, 413, f"request body too large: at most {max_bytes} bytes", close=True)


def endpoint_label(path: str) -> str:
    """A bounded metrics label per API route (never the raw path: user ids would explode it)."""
    if path == "/v1/recommend":
        return "recommend"
    if path.startswith("/v1/users/"):
        return "user_recommendations"
    if path == "/v1/events":
        return "events"
    return "variants" if path == "/v1/variants" else "other"


# What request log lines and spans name a route by (raw paths hold user ids).
ROUTE_TEMPLATES = {
    "recommend": "/v1/recommend",
    "user_recommendations": "/v1/users/{user_id}/recommendations",
    "events": "/v1/events",
    "variants": "/v1/variants",
    "other": "/v1/*",
}


class InstrumentMiddleware:
    """Give every HTTP request its id (`observability.request_id`, for the log lines it causes);
    count /v1 requests and errors by variant, endpoint and status, time them by variant, and,
    per `telemetry`, log one line per request (JSON format) and trace it.

    Latency stops when the last body byte is sent: shadow work that runs after the
    response (BackgroundTasks) is not the client's latency.
    """

    def __init__(self, app, metrics: Metrics, telemetry: observability.Telemetry | None = None):
        self.app, self.metrics = app, metrics
        self.telemetry = telemetry or observability.Telemetry()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = observability.request_id.set(observability.request_id_from(scope["headers"]))
        try:
            if not scope["path"].startswith("/v1/"):
                return await self.app(scope, receive, send)
            await self._instrumented(scope, receive, send)
        finally:
            observability.request_id.reset(token)

    async def _instrumented(self, scope, receive, send):
        state = scope.setdefault("state", {})  # what handlers set on request.state
        status, started, recorded = 500, time.perf_counter(), False
        endpoint = endpoint_label(scope["path"])
        telemetry, tracing = self.telemetry, self.telemetry.tracing
        span = None
        if tracing is not None:
            span = tracing.start(scope["method"], ROUTE_TEMPLATES[endpoint], scope["headers"], started)

        def record():
            nonlocal recorded
            recorded = True
            variant, ended = state.get("variant", NO_VARIANT), time.perf_counter()
            metrics = self.metrics
            metrics.child(metrics.requests, variant, endpoint, str(status)).inc()
            if status >= 400:
                metrics.child(metrics.errors, variant, endpoint, str(status)).inc()
            metrics.child(metrics.latency, variant, endpoint).observe(ended - started)
            if telemetry.request_log:
                trace_id = observability.trace_id_of(span) if span is not None else None
                route = ROUTE_TEMPLATES[endpoint]
                observability.log_request(scope["method"], route, status, ended - started, state, trace_id)
            if span is not None and tracing is not None:
                tracing.finish(span, status, state, ended)

        async def capture(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                record()

        try:
            await self.app(scope, receive, capture)
        finally:
            if not recorded:  # an exception before the response: uvicorn answers 500
                record()
