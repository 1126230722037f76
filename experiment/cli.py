"""`slimrec experiment`: the argparse part. Imports stay light; the handler imports the report.

    slimrec experiment report LOGDIR [--out DIR] [--window N] [--k K] [--bootstrap B] [--seed S]

LOGDIR is a server's --log-dir (or a replay's logs/): every *.jsonl segment in it is read.
"""

from __future__ import annotations

from pathlib import Path

from slimrec.bench.argtypes import positive_int


def register(subparsers) -> None:
    """Add the `experiment` command (report, logging-cost) and `replay` to slimrec's argparse subparsers."""
    register_replay(subparsers)
    experiment = subparsers.add_parser("experiment", help="judge A/B experiments from the servers' logs")
    experiment.set_defaults(run=lambda _: experiment.print_help() or 2, command="experiment")
    commands = experiment.add_subparsers(dest="experiment_command")
    report = commands.add_parser(
        "report",
        help="which arm wins: exposures joined with the events that followed them",
        description="Per arm: hit rate@k and NDCG@k with bootstrap intervals over users, coverage, "
        "latency, fallbacks; arm differences (paired or unpaired); sample-ratio checks per split.",
    )
    report.add_argument("logdir", type=Path, metavar="LOGDIR", help="directory of *.jsonl log segments")
    report.add_argument("--out", type=Path, default=None, help="output directory (default LOGDIR/report)")
    report.add_argument(
        "--window",
        type=positive_int,
        default=10,
        help="an event credits an exposure only if among the user's next N events after it (default 10)",
    )
    report.add_argument(
        "--k", type=positive_int, default=10, help="hit rate@k and NDCG@k cut-off (default 10)"
    )
    report.add_argument(
        "--bootstrap", type=positive_int, default=2000, help="bootstrap resamples over users (default 2000)"
    )
    report.add_argument("--seed", type=int, default=0, help="seed of every resample (default 0)")
    report.set_defaults(run=run_report, command="experiment report")
    cost = commands.add_parser(
        "logging-cost",
        help="server CPU per request with exposure and event logging on vs off (a benchmark)",
    )
    cost.add_argument("--artifact", type=Path, default=Path("artifacts/compressed"), help="artifact to serve")
    cost.add_argument(
        "--requests", type=positive_int, default=5000, help="recommendation + event pairs per round"
    )
    cost.add_argument(
        "--rounds", type=positive_int, default=3, help="rounds per setting, alternating (default 3)"
    )
    cost.add_argument("--concurrency", type=positive_int, default=8, help="clients at once (default 8)")
    cost.add_argument("--out", type=Path, default=None, help="write the figures as JSON here too")
    cost.set_defaults(run=run_logging_cost, command="experiment logging-cost")


def run_report(args) -> int:
    from slimrec.experiment.report import build_report
    from slimrec.experiment.report_render import render_markdown, write_report
    from slimrec.serving.eventlog import read_log

    if not args.logdir.is_dir():
        raise FileNotFoundError(f"{args.logdir}: no such log directory")
    log = read_log(args.logdir)
    if not any(r.get("kind") == "exposure" for r in log.records):
        raise ValueError(
            f"{args.logdir}: no exposure records in {len(log.records):,} log records; "
            "pass the directory a server logged to (slimrec serve --log-dir, or a replay's logs/)"
        )
    report = build_report(
        log.records,
        window=args.window,
        k=args.k,
        bootstrap=args.bootstrap,
        seed=args.seed,
        read_stats=log.stats,
    )
    write_report(report, args.out or args.logdir / "report")
    print(render_markdown(report), end="")
    return 0


def run_logging_cost(args) -> int:
    import json

    from slimrec.experiment.cost import logging_cost

    figures = logging_cost(args.artifact, args.requests, args.rounds, args.concurrency)
    cpu = figures["cpu_us_per_request"]
    print(
        f"server CPU per request (median of {args.rounds}): logging on {cpu['on']:.0f} us, "
        f"off {cpu['off']:.0f} us, on/off {figures['ratio_on_off']:.3f}; {figures['failures']} failed"
    )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if figures["failures"] else 0


def register_replay(subparsers) -> None:
    p = subparsers.add_parser(
        "replay", help="play the test fold as live traffic through real servers, then report the A/B outcome"
    )
    p.add_argument("--data", default="ml-100k", help="dataset name under $SLIMREC_DATA_DIR, or a directory")
    p.add_argument("--start", action="append", required=True, metavar="NAME=ARTIFACT,...", help="variants")
    p.add_argument(
        "--split", metavar="NAME=WEIGHT,...", help="A/B weights (default: equal); not with --paired"
    )
    p.add_argument(
        "--paired", action="store_true", help="every user through every arm, each with its own state"
    )
    p.add_argument(
        "--live-history",
        choices=["on", "off", "both"],
        default="on",
        help="events enter live histories (on), are only logged (off), or both, as arms NAME and NAME-frozen",
    )
    p.add_argument("--k", type=int, default=10, help="recommendations per request (default 10)")
    p.add_argument("--concurrency", type=int, default=4, help="users played at once per server (default 4)")
    p.add_argument("--limit-users", type=int, default=None, help="play only the first N users")
    p.add_argument("--max-seconds", type=float, default=3600.0, help="stop playing after this long")
    p.add_argument(
        "--window", type=int, default=10, help="report: an event credits exposures this many events back"
    )
    p.add_argument("--out", type=Path, default=Path("runs/replay"))
    p.set_defaults(run=run_replay, command="replay")


def run_replay(args) -> int:
    from slimrec.experiment.replay import run_replay as run

    return run(args)
