"""Request ids in every log line, JSON log lines, and OpenTelemetry traces (the `otel` extra).

- `request_id` (a ContextVar) holds the id of the HTTP request being handled: the client's
  `X-Request-ID` when valid, else a new one. `RequestIdFilter` stamps it on every log record
  emitted while it is set. Threads and processes that run a batch of several requests (the
  batchers, model processes, a Ray replica) do not inherit it: code there binds the batch's ids
  with `bind_request_ids(ids)`, and the lines it emits carry `request_ids`.
- `configure_logging(log_format, level)`: text (uvicorn's look) or JSON lines (`JsonFormatter`:
  ts, level, logger, message, request_id, and any `extra=` fields), for slimrec's loggers and
  uvicorn's; `logging_config` is the same as a dictConfig for uvicorn's `log_config`.
- `log_request(...)`: the one line per answered /v1 request (logger "slimrec.requests").
- `Telemetry`: per app, the request log switch and tracing; `start_tracing(setting)` decides by
  the rule in `tracing_wanted`. A server span per /v1 request, parented by the client's W3C
  `traceparent`, with child spans queue, embed, retrieve and rank laid end to end from the
  moment the query was submitted (the answer's timings; gaps between stages are not shown).

opentelemetry is imported only inside the tracing functions, and only when tracing is on.
"""

from __future__ import annotations

import itertools
import logging
import logging.config
import os
import re
import secrets
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

log = logging.getLogger("slimrec.serving")
requests_log = logging.getLogger("slimrec.requests")

LogFormat = Literal["text", "json"]
STAGES = ("queue", "embed", "retrieve", "rank")  # the order they run in, as Answer.timings names them

request_id: ContextVar[str | None] = ContextVar("slimrec_request_id", default=None)
batch_request_ids: ContextVar[tuple[str, ...]] = ContextVar("slimrec_batch_request_ids", default=())

_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Generated ids: a random tag per process, then a counter (unique, and cheaper than a uuid4).
_PROCESS_TAG = secrets.token_hex(6)
_REQUEST_COUNTER = itertools.count()


# --- request ids -------------------------------------------------------------------------------------


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The request's id: its `X-Request-ID` if that is 1-64 of [A-Za-z0-9._-], else a new one.

    Example:
        >>> request_id_from([(b"x-request-id", b"abc-1")])
        'abc-1'
    """
    for name, value in headers:  # ASGI header names are lower case
        if name == b"x-request-id":
            given = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(given):
                return given
            break
    return new_request_id()


def new_request_id() -> str:
    """A process-unique id: `<12 hex digits of this process>-<counter in hex>`."""
    return f"{_PROCESS_TAG}-{next(_REQUEST_COUNTER):x}"


@contextmanager
def bind_request_ids(ids: Iterable[str]) -> Iterator[None]:
    """Log lines emitted inside carry `request_ids`: for code that runs a batch of requests on a
    thread or process of its own (contextvars do not follow work there)."""
    token = batch_request_ids.set(tuple(ids))
    try:
        yield
    finally:
        batch_request_ids.reset(token)


class RequestIdFilter(logging.Filter):
    """Stamp `request_id` (and `request_ids` inside `bind_request_ids`) on every record; an
    `extra=` value of the same name wins. Attach it to handlers: logger filters skip children."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id.get()
        ids = batch_request_ids.get()
        if ids and not hasattr(record, "request_ids"):
            record.request_ids = list(ids)
        return True


# --- log formats -------------------------------------------------------------------------------------

# LogRecord attributes that are not `extra=` fields (uvicorn adds color_message to its own lines).
_RECORD_FIELDS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
    "request_id",
    "request_ids",
}


_second = (-1, "")  # the last whole second formatted, and its text: one strftime per second


def iso_utc(created: float) -> str:
    """Unix time as ISO 8601 UTC with microseconds, e.g. '2025-01-31T12:00:00.123456Z'."""
    global _second
    whole = int(created)
    if whole != _second[0]:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    return f"{_second[1]}.{int((created - whole) * 1e6):06d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (ISO 8601 UTC), level, logger, message, request_id (when
    set), request_ids (batches), the record's `extra=` fields, and exc (the traceback) if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if (rid := getattr(record, "request_id", None)) is not None:
            line["request_id"] = rid
        if ids := getattr(record, "request_ids", None):
            line["request_ids"] = ids
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                line.setdefault(key, value)
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra orjson cannot write (a Path, an exception) still makes a line.
        return orjson.dumps(line, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


class TextFormatter(logging.Formatter):
    """uvicorn's look (`INFO:     name: message`), with `[request_id=...]` when a request caused it."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s:     %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if (rid := getattr(record, "request_id", None)) is not None:
            return f"{text} [request_id={rid}]"
        if ids := getattr(record, "request_ids", None):
            return f"{text} [request_ids={','.join(ids)}]"
        return text


def logging_config(log_format: LogFormat, level: str) -> dict[str, Any] | None:
    """A logging.config.dictConfig for uvicorn's `log_config`; None for text (uvicorn's own).

    JSON: one handler on the root logger (stderr), so slimrec's, uvicorn's and any library's
    warnings all come out as JSON lines; slimrec and uvicorn log at `level`, the rest at warning;
    uvicorn's access log is off (one `log_request` line per request instead).
    """
    if log_format == "text":
        return None
    here = __name__
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": f"{here}.RequestIdFilter"}},
        "formatters": {"json": {"()": f"{here}.JsonFormatter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "json",
                "filters": ["request_id"],
            }
        },
        "root": {"level": "WARNING", "handlers": ["json"]},
        "loggers": {
            **{
                name: {"level": level, "handlers": [], "propagate": True}
                for name in ("slimrec", "uvicorn", "uvicorn.error", "uvicorn.asgi")
            },
            # Replaced by log_request's line (uvicorn logs access lines only when this has a handler).
            "uvicorn.access": {"handlers": [], "propagate": False},
        },
    }


def configure_logging(log_format: LogFormat, level: str) -> None:
    """Where and how the server's log lines go (idempotent; every server process calls it).

    text: a handler on the "slimrec" logger with uvicorn's look (uvicorn keeps its own).
    json: `logging_config` (JSON lines on stderr for every logger), and Python warnings logged.
    """
    logger = logging.getLogger("slimrec")
    logger.setLevel(level.upper())
    config = logging_config(log_format, level)
    if config is not None:
        logging.config.dictConfig(config)
        logging.captureWarnings(True)
        return
    if not any(getattr(h, "slimrec_text", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.slimrec_text = True  # type: ignore[attr-defined]
        handler.setFormatter(TextFormatter())
        handler.addFilter(RequestIdFilter())
        logger.addHandler(handler)


def log_request(
    method: str, route: str, status: int, latency_s: float, state: Mapping[str, Any], trace_id: str | None
) -> None:
    """The one line per answered /v1 request (request_id comes from the filter).

    `state`: the request's scope["state"]; the recommendation handler puts `variant`,
    `model_version` and `answer` there (serving/api.py).
    """
    if not requests_log.isEnabledFor(logging.INFO):
        return
    fields: dict[str, Any] = {
        "method": method,
        "path": route,
        "status": status,
        "latency_ms": round(latency_s * 1000, 3),
    }
    if "variant" in state:
        fields["variant"] = state["variant"]
    if "model_version" in state:
        fields["model_version"] = state["model_version"]
        fields["fallback"] = state["answer"].fallback
    if trace_id is not None:
        fields["trace_id"] = trace_id
    requests_log.info("%s %s %d", method, route, status, extra=fields)


# --- tracing -----------------------------------------------------------------------------------------

# perf_counter (what the server times with) to Unix epoch nanoseconds (what spans carry): one
# offset, so a request's spans nest exactly as its timings do.
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def epoch_ns(perf_seconds: float) -> int:
    """A time.perf_counter() reading as Unix epoch nanoseconds."""
    return _EPOCH_OFFSET_NS + int(perf_seconds * 1e9)


_installed_provider: TracerProvider | None = None


def install_tracer_provider(provider: TracerProvider | None) -> None:
    """Trace every app started from now on in this process into `provider` (tests, an embedding
    host, a Ray replica that configures its own); None undoes it. The caller owns the provider:
    apps never shut it down. Without it, apps build one from the OTEL_* environment."""
    global _installed_provider
    _installed_provider = provider


def tracing_wanted(setting: bool | None, env: Mapping[str, str] = os.environ) -> bool:
    """The rule: OTEL_SDK_DISABLED=true turns tracing off; else the setting (`--tracing`,
    `--no-tracing`, SLIMREC_TRACING) decides; unset, tracing is on when OTEL_TRACES_EXPORTER
    names an exporter other than none, or an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT,
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT).

    Example:
        >>> tracing_wanted(None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
        True
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if setting is not None:
        return setting
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def tracer_provider_from_env(env: Mapping[str, str] = os.environ) -> TracerProvider:
    """An SDK TracerProvider configured by the standard variables: OTEL_SERVICE_NAME (default
    "slimrec") and OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_* (batching),
    OTEL_TRACES_EXPORTER (otlp, the default, over http/protobuf; console: one JSON line per span
    on stdout; none) and the OTLP exporter's own OTEL_EXPORTER_OTLP_* (endpoint, headers, ...).

    Raises:
        ImportError: the `otel` extra is not installed.
        ValueError: an exporter or OTLP protocol this install cannot provide.
    """
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "slimrec"}))
    provider = TracerProvider(resource=resource)  # the sampler comes from OTEL_TRACES_SAMPLER
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").lower().split(",") if n.strip()]
    for name in names:
        exporter: SpanExporter
        if name == "none":
            continue
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
                "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
            )
            if protocol != "http/protobuf":
                raise ValueError(
                    f"OTLP protocol {protocol!r}: slimrec[otel] exports over http/protobuf only "
                    "(set OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf, port 4318)"
                )
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        elif name == "console":
            exporter = ConsoleSpanExporter(formatter=lambda span: span.to_json(indent=None) + "\n")
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER={name!r}: slimrec supports otlp, console or none")
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


class Tracing:
    """Spans of one app: a server span per /v1 request and its stage spans (see the module docstring)."""

    def __init__(self, provider: TracerProvider, owned: bool):
        from opentelemetry import propagate, trace
        from opentelemetry.trace import SpanKind, StatusCode

        self.provider, self.owned = provider, owned
        self.tracer = provider.get_tracer("slimrec.serving")
        self._extract, self._in_context = propagate.extract, trace.set_span_in_context
        self._server, self._error = SpanKind.SERVER, StatusCode.ERROR

    def start(self, method: str, route: str, headers: Iterable[tuple[bytes, bytes]], started: float) -> Span:
        """The request's server span, child of the client's `traceparent` (and `tracestate`) if
        any; `started`: perf_counter when the request arrived. Route templates, never raw paths
        (they hold user ids)."""
        carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers}
        return self.tracer.start_span(
            f"{method} {route}",
            context=self._extract(carrier),
            kind=self._server,
            start_time=epoch_ns(started),
            attributes={"http.request.method": method, "http.route": route, "url.path": route},
        )

    def finish(self, span: Span, status: int, state: Mapping[str, Any], ended: float) -> None:
        """Attributes from the answer, the stage spans, then end the span at `ended` (perf_counter)."""
        if not span.is_recording():  # sampled out
            span.end(end_time=epoch_ns(ended))
            return
        attributes: dict[str, str | int] = {"http.response.status_code": status}
        if (rid := request_id.get()) is not None:
            attributes["slimrec.request_id"] = rid
        if "variant" in state:
            attributes["slimrec.variant"] = state["variant"]
        if status >= 500:
            attributes["error.type"] = str(status)
            span.set_status(self._error)
        if "model_version" in state:
            answer = state["answer"]
            attributes["slimrec.model_version"] = state["model_version"]
            attributes["slimrec.fallback"] = answer.fallback or "none"
            attributes["slimrec.batch_size"] = answer.batch_size
            self._stage_spans(span, state["submitted_at"], answer.timings)
        span.set_attributes(attributes)
        span.end(end_time=epoch_ns(ended))

    def _stage_spans(self, parent: Span, submitted_at: float, timings: Mapping[str, float]) -> None:
        """queue, embed, retrieve, rank end to end from `submitted_at`, each as long as it took."""
        context = self._in_context(parent)
        at = submitted_at
        for stage in STAGES:
            seconds = timings.get(stage)
            if seconds is None:  # e.g. the popularity list: no model stages
                continue
            span = self.tracer.start_span(stage, context=context, start_time=epoch_ns(at))
            at += max(seconds, 0.0)
            span.end(end_time=epoch_ns(at))

    def shutdown(self) -> None:
        """Export what is buffered and stop, if this app built the provider."""
        if self.owned:
            self.provider.shutdown()


def trace_id_of(span: Span) -> str | None:
    """The span's trace id as W3C writes it (32 hex digits); None for an invalid span."""
    context = span.get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def start_tracing(setting: bool | None) -> Tracing | None:
    """Tracing for one app: the installed provider, else one from the environment when
    `tracing_wanted`; None when off.

    Raises:
        RuntimeError: tracing asked for by the setting, but the `otel` extra is not installed
            (asked for only by OTEL_* variables, that is a warning and tracing stays off).
        ValueError: an unsupported exporter or protocol in the OTEL_* variables.
    """
    if _installed_provider is not None:
        return Tracing(_installed_provider, owned=False)
    if not tracing_wanted(setting):
        return None
    try:
        provider = tracer_provider_from_env()
    except ImportError as exc:
        hint = "OpenTelemetry's SDK is not installed: pip install 'slimrec[otel]'"
        if setting:
            raise RuntimeError(f"tracing is on (--tracing / SLIMREC_TRACING) but {hint}") from exc
        log.warning("OTEL_* variables ask for traces but %s; tracing off", hint)
        return None
    log.info("tracing on: service %s", provider.resource.attributes.get("service.name"))
    return Tracing(provider, owned=True)


class Telemetry:
    """What one app's instrumentation middleware does beside metrics: the request log line
    (JSON format only; in text format uvicorn's access log covers it) and tracing (`start()` in
    the lifespan; `tracing` stays None when off)."""

    def __init__(self, log_format: LogFormat = "text", tracing: bool | None = None):
        self.request_log = log_format == "json"
        self.tracing_setting = tracing
        self.tracing: Tracing | None = None

    def start(self) -> None:
        self.tracing = start_tracing(self.tracing_setting)

    def stop(self) -> None:
        if self.tracing is not None:
            self.tracing.shutdown()
            self.tracing = None
