"""`slimrec loadtest`: the argparse part. Imports stay light; the handler imports the runner.

    slimrec loadtest (--host URL | --start full=ART,compressed=ART) --users 16 --spawn-rate 16 \\
        --duration 60s --mode per-variant|ab [--rate RPS] [--workers N] [--ceiling] [--out DIR]
    slimrec loadtest --start full=ART,compressed=ART --generator wrk --duration 10s --ceiling
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def register(subparsers) -> None:
    """Add the `loadtest` subcommand to slimrec's argparse subparsers."""
    p = subparsers.add_parser(
        "loadtest",
        help="load test of the served variants (locust or wrk); RPS, latency and server CPU per request",
        description="Run locust headless (or wrk) against the variants (each in turn, or the A/B split), "
        "optionally against a trivial FastAPI endpoint (the ceiling); read the server's CPU time over "
        "each phase; write loadtest-report.{md,json}, a latency PNG and locust's CSVs to --out.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--host", metavar="URL", help="a running `slimrec serve` (e.g. http://127.0.0.1:8000)"
    )
    target.add_argument(
        "--start",
        action="append",
        metavar="NAME=ARTIFACT[,NAME=ARTIFACT]",
        help="serve these variants on a free 127.0.0.1 port for the run (repeatable)",
    )
    p.add_argument("--split", metavar="NAME=WEIGHT,...", help="A/B weights for --start (default: equal)")
    p.add_argument(
        "--batcher",
        choices=["on", "off"],
        default=None,
        help="with --start: the server's request batcher on (its default settings) or off "
        "(batch of 1); run once each to measure what batching gains",
    )
    p.add_argument(
        "--model-process",
        action="store_true",
        help="with --start: model calls in child processes (serve --model-process)",
    )
    p.add_argument(
        "--catalogue",
        type=Path,
        metavar="PATH",
        help="artifact dir or catalogue.json to draw ids from (default: the served artifacts')",
    )
    p.add_argument(
        "--mode",
        choices=["per-variant", "ab"],
        default="per-variant",
        help="per-variant: each variant in turn, forced by X-Slimrec-Variant, same load; "
        "ab: the configured split",
    )
    p.add_argument(
        "--generator",
        choices=["locust", "wrk"],
        default="locust",
        help="locust: the realistic mix (default); wrk: POST /v1/recommend for known users, k=10, "
        "at saturation, ~4x cheaper per request than locust (per-variant mode; wrk must be on PATH)",
    )
    p.add_argument("--wrk-threads", type=int, default=1, help="with --generator wrk: its threads (default 1)")
    p.add_argument(
        "--users",
        type=int,
        default=16,
        help="concurrent simulated users; with wrk, its connections (default 16)",
    )
    p.add_argument(
        "--spawn-rate", type=float, default=None, help="users started per second (default: --users)"
    )
    p.add_argument("--duration", default="60s", help="per phase: 60s, 2m, 1m30s (default 60s)")
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        metavar="RPS",
        help="fixed offered load: RPS over all users (constant throughput per user); "
        "default: saturation (no think time)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="locust workers beside a master (default 0: one locust process)",
    )
    p.add_argument(
        "--ceiling", action="store_true", help="also drive loadtest/ceiling_app.py with the same settings"
    )
    p.add_argument(
        "--warmup",
        default=None,
        help="leave out the first part of each phase (default: the ramp, users / spawn rate); with "
        "wrk, a separate unmeasured run this long (whole seconds) before the measured --duration",
    )
    p.add_argument("--max-requests", type=int, default=None, help="request cap per phase (default: generous)")
    p.add_argument("--new-user-share", type=float, default=0.2, help="share of unknown users with a history")
    p.add_argument(
        "--genre-share", type=float, default=0.1, help="share of known-user requests with a genre filter"
    )
    p.add_argument("--k-mix", default=None, help="K:WEIGHT,... (default 10:70,20:15,50:10,100:5)")
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of user and item popularity")
    p.add_argument("--out", type=Path, default=None, help="output directory (default runs/loadtest-<time>)")
    p.set_defaults(run=run_loadtest_command, command="loadtest")


def parse_start(values: list[str]) -> dict[str, str]:
    variants: dict[str, str] = {}
    for value in values:
        for pair in value.split(","):
            name, sep, path = pair.strip().partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--start: expected NAME=ARTIFACT_DIR, got {pair!r}")
            if name in variants:
                raise ValueError(f"--start: {name!r} given twice")
            if not Path(path).is_dir():
                raise FileNotFoundError(f"--start {name}={path}: not a directory")
            variants[name] = path
    return variants


def config_from_args(args: argparse.Namespace):
    from slimrec.loadtest.run import LoadConfig
    from slimrec.loadtest.units import parse_duration
    from slimrec.loadtest.workload import DEFAULT_K_MIX, RequestMix

    return LoadConfig(
        users=args.users,
        spawn_rate=args.spawn_rate or float(args.users),
        duration_s=parse_duration(args.duration),
        mode=args.mode,
        rate=args.rate,
        workers=args.workers,
        warmup_s=None if args.warmup is None else parse_duration(args.warmup),
        max_requests=args.max_requests,
        ceiling=args.ceiling,
        zipf=args.zipf,
        mix=RequestMix(args.new_user_share, args.genre_share, args.k_mix or DEFAULT_K_MIX),
        generator=args.generator,
        wrk_threads=args.wrk_threads,
    )


def run_loadtest_command(args: argparse.Namespace) -> int:
    """Validate, run every phase, print the markdown report and where the files are."""
    from slimrec.loadtest.report import render_markdown
    from slimrec.loadtest.run import run_loadtest

    config = config_from_args(args)
    start = parse_start(args.start) if args.start else None
    if (args.split or args.batcher or args.model_process) and not start:
        raise ValueError(
            "--split, --batcher and --model-process go with --start (a running server has its own settings)"
        )
    serve_args = ("--batch-max-size", "1") if args.batcher == "off" else ()
    if args.model_process:
        serve_args += ("--model-process",)
    out = args.out or Path("runs") / time.strftime("loadtest-%Y%m%d-%H%M%S")
    try:
        report, paths = run_loadtest(
            config,
            out,
            host=args.host,
            start=start,
            split=args.split,
            catalogue=args.catalogue,
            serve_args=serve_args,
        )
    except (RuntimeError, TimeoutError, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        import sys

        print(f"slimrec loadtest: failed: {exc}", file=sys.stderr)
        return 1
    print(render_markdown(report))
    print("\n".join(f"{kind}: {path}" for kind, path in paths.items()))
    if config.generator == "locust":
        print(f"locust CSVs: {out}/<phase>_stats.csv, _stats_history.csv, _failures.csv")
    else:
        print(f"wrk output: {out}/logs/wrk-<phase>.log, its script: {out}/wrk-<phase>.lua")
    return 0
