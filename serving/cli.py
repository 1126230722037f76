"""`slimrec serve`: the argparse part. Imports stay light; the handler imports the server.

    slimrec serve --variant full=artifacts/teacher --variant compressed=artifacts/compressed \\
                  --split full=50,compressed=50 [--host 127.0.0.1 --port 8000 --workers N]

Every option can also come from SLIMREC_* environment variables or a TOML file
(`--config serve.toml`); command-line options win, then the environment, then the file.
The admin token is read from SLIMREC_ADMIN_TOKEN only (a flag would show in `ps`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    """Add the `serve` subcommand to slimrec's argparse subparsers."""
    serve = subparsers.add_parser("serve", help="serve variants over HTTP (A/B split, shadow, metrics)")
    serve.add_argument(
        "--variant",
        action="append",
        metavar="NAME=ARTIFACT_DIR",
        help="a variant to serve; repeat for A/B (e.g. full=artifacts/teacher)",
    )
    serve.add_argument("--split", metavar="NAME=WEIGHT,...", help="A/B weights (default: equal)")
    serve.add_argument("--config", type=Path, help="TOML file with any serve setting")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int, help="uvicorn worker processes (each loads every variant)")
    serve.add_argument("--salt", help="A/B hash salt")
    serve.add_argument(
        "--n-candidates",
        type=int,
        help="FAISS top-N passed to the ranker, for every variant (default: each artifact's "
        "budget chosen on validation, else 200)",
    )
    serve.add_argument("--batch-max-size", type=int, help="max queries per model call; 1 = no batching")
    serve.add_argument(
        "--batch-max-wait-ms",
        type=float,
        help="max wait for a batch to fill (default 2 with one worker, 0 with --workers > 1)",
    )
    serve.add_argument("--batch-threads", type=int, help="batches each variant runs at once (default 1)")
    serve.add_argument(
        "--model-threads", type=int, help="threads running model calls when batching is off (default 2)"
    )
    serve.add_argument(
        "--model-process",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run model calls in child processes, each with its own GIL (default: off; "
        "costs the model's memory once more per child)",
    )
    serve.add_argument(
        "--shadow-fraction",
        type=float,
        help="fraction of requests also answered by another variant, for agreement metrics",
    )
    serve.add_argument(
        "--allow-variant-override",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="honour X-Slimrec-Variant (default: only when bound to loopback)",
    )
    serve.add_argument(
        "--artifacts-root",
        action="append",
        type=Path,
        help="directory admin reloads may load from (repeatable)",
    )
    serve.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    serve.add_argument(
        "--log-format",
        choices=["text", "json"],
        help="json: every log line a JSON object (request_id in each line a request causes) and "
        "one line per /v1 request instead of uvicorn's access log (default: text)",
    )
    serve.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="uvicorn's access line per request (text logs at info/debug; default off: the exposure "
        "log and /metrics record every recommendation)",
    )
    serve.add_argument(
        "--tracing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="OpenTelemetry traces, exported where the OTEL_* variables say (needs slimrec[otel]; "
        "default: on when OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_ENDPOINT is set)",
    )
    serve.add_argument(
        "--state",
        metavar="URL",
        help="redis://HOST:PORT/DB: live histories and the split shared by every process naming it "
        "(default: kept in this process)",
    )
    serve.add_argument(
        "--state-dir", type=Path, help="the split's state file and the logs (default ./slimrec-state)"
    )
    serve.add_argument("--log-dir", type=Path, help="exposure and event logs (default STATE_DIR/logs)")
    serve.add_argument(
        "--event-log",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="log every exposure and event (default: on)",
    )
    serve.add_argument(
        "--live-history",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="posted events enter the users' histories (default: on; off: logged only)",
    )
    serve.add_argument(
        "--history-event-types", metavar="TYPE,...", help="event types that enter histories (default: all)"
    )
    add_ray_arguments(serve)
    serve.set_defaults(run=run_serve, command="serve")


def add_ray_arguments(serve) -> None:
    """`--engine ray` and its options (serving/ray_cli.py; Ray comes with the ray extra)."""
    serve.add_argument(
        "--engine",
        choices=["uvicorn", "ray"],
        help="uvicorn (default): this process serves; ray: a Ray Serve application with replicas",
    )
    ray = serve.add_argument_group("--engine ray")
    ray.add_argument(
        "--address",
        dest="ray_address",
        metavar="HOST:PORT",
        help="Ray cluster to join (default: RAY_ADDRESS, else a local cluster started and stopped here)",
    )
    ray.add_argument(
        "--num-cpus", dest="ray_num_cpus", type=int, help="CPUs of the local cluster (default: all)"
    )
    ray.add_argument("--ingress-replicas", type=int, help="ingress replicas (more than one needs --state)")
    ray.add_argument(
        "--model-replicas",
        metavar="N|NAME=N,...",
        help="replicas of each variant's model deployment (default 1)",
    )
    ray.add_argument(
        "--ingress-max-replicas",
        type=int,
        metavar="N",
        help="autoscale the ingress up to N replicas (from --ingress-replicas; needs --state)",
    )
    ray.add_argument(
        "--model-max-replicas",
        type=int,
        metavar="N",
        help="autoscale each model deployment up to N replicas (from its --model-replicas)",
    )
    ray.add_argument("--ingress-num-cpus", type=float, help="Ray CPUs per ingress replica (default 0.25)")
    ray.add_argument("--model-num-cpus", type=float, help="Ray CPUs per model replica (default 0.25)")
    ray.add_argument(
        "--print-config",
        action="store_true",
        help="print the Serve config (YAML) for `serve run FILE` / `serve deploy FILE`, and exit",
    )


def settings_from_args(args: argparse.Namespace):
    """Settings from parsed arguments (+ env + config file); ValueError with one clear line."""
    from pydantic import ValidationError
    from slimrec.serving.settings import Settings, parse_pairs

    overrides = {
        name: getattr(args, name)
        for name in (
            "host",
            "port",
            "workers",
            "salt",
            "n_candidates",
            "batch_max_size",
            "batch_max_wait_ms",
            "batch_threads",
            "model_threads",
            "model_process",
            "shadow_fraction",
            "allow_variant_override",
            "log_level",
            "log_format",
            "access_log",
            "tracing",
            "split",
            "state",
            "state_dir",
            "log_dir",
            "event_log",
            "live_history",
            "history_event_types",
            "engine",
            "ray_address",
            "ray_num_cpus",
            "ingress_replicas",
            "model_replicas",
            "ingress_max_replicas",
            "model_max_replicas",
            "ingress_num_cpus",
            "model_num_cpus",
        )
        if getattr(args, name) is not None
    }
    if args.config is not None:
        overrides["config_file"] = args.config
    if args.artifacts_root:
        overrides["artifacts_roots"] = args.artifacts_root
    if args.variant:
        variants: dict[str, str] = {}
        for text in args.variant:
            for name, path in parse_pairs(text, "--variant").items():
                if name in variants:
                    raise ValueError(f"--variant: {name!r} given twice")
                variants[name] = path
        overrides["variants"] = variants
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ValueError(validation_message(exc)) from None


def validation_message(exc) -> str:
    """One line from a pydantic ValidationError: 'field: problem; ...'."""
    parts = []
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {message}" if where and not message.startswith(f"{where}:") else message)
    return "; ".join(parts)


def run_serve(args: argparse.Namespace) -> int:
    """Validate the settings, hand them to uvicorn's workers through the environment, and serve.

    On SIGTERM/SIGINT uvicorn stops accepting, lets in-flight requests finish (30 s at most),
    runs the lifespan shutdown (batchers drain), and the command exits 0.
    """
    import logging
    import os
    import tempfile

    import uvicorn
    from slimrec.serving import observability
    from slimrec.serving.app import GracefulServer
    from slimrec.serving.workers import serve_workers

    settings = settings_from_args(args)
    if settings.engine == "ray" or args.print_config:
        from slimrec.serving import ray_cli  # Ray is imported for this engine only

        if not args.print_config:
            return ray_cli.run_ray(settings)
        if settings.engine != "ray":
            raise ValueError("--print-config writes a Ray Serve config: use it with --engine ray")
        return ray_cli.print_config(settings)
    if settings.workers > 1 and not settings.state:
        warning = (
            f"{settings.workers} workers keep live histories each in its own "
            "memory (a user's events reach one of them); --state redis://... shares them"
        )
        if settings.log_format == "json":  # stderr holds JSON lines only
            observability.configure_logging("json", settings.log_level)
            logging.getLogger("slimrec.serving").warning(warning)
        else:
            print(f"slimrec serve: warning: {warning}", file=sys.stderr)
    os.environ.update(settings.to_env())  # workers (separate processes) rebuild the same Settings
    options = uvicorn_options(settings)
    if settings.workers > 1:
        # Every worker writes its metrics under this directory; any worker's /metrics sums them.
        with tempfile.TemporaryDirectory(prefix="slimrec-metrics-") as metrics_dir:
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
            return serve_workers(
                uvicorn.Config(
                    "slimrec.serving.app:create_app_from_env",
                    factory=True,
                    workers=settings.workers,
                    **options,
                )
            )
    server = GracefulServer(
        uvicorn.Config("slimrec.serving.app:create_app_from_env", factory=True, **options)
    )
    server.run()
    return 0 if server.started else 3  # 3: startup failed (uvicorn's code), e.g. an artifact refused


def uvicorn_options(settings) -> dict:
    """uvicorn.run's options for these settings (host, port, logging, shutdown)."""
    from slimrec.serving import observability

    # Access lines are info records: above info uvicorn would still format each one's arguments
    # (client address, quoted path) only for the logger to drop it.
    options = dict(
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.access_log and settings.log_level in ("info", "debug"),
        timeout_graceful_shutdown=30,
        server_header=False,
    )
    if settings.log_format == "json":  # uvicorn's lines as JSON; our request line replaces its access log
        options.update(log_config=observability.logging_config("json", settings.log_level), access_log=False)
    return options
