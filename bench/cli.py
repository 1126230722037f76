"""`slimrec bench`: the argparse part. Imports stay light; the handler imports the measuring code.

    slimrec bench [--full artifacts/teacher --compressed artifacts/compressed] [--out runs/bench]
    slimrec bench --catalogue 10k,100k,1m [--out runs/scale]

The first form times two artifacts of one dataset (bench/stages.py); the second builds
synthetic catalogues, trains models for them and benches those (bench/scale.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

from slimrec.bench.argtypes import count, int_list, positive_int


def register(subparsers) -> None:
    """Add the `bench` subcommand to slimrec's argparse subparsers."""
    bench = subparsers.add_parser(
        "bench", help="offline latency and memory of full vs compressed (or across synthetic catalogue sizes)"
    )
    bench.add_argument("--full", type=Path, default=Path("artifacts/teacher"), help="full (teacher) artifact")
    bench.add_argument(
        "--compressed", type=Path, default=Path("artifacts/compressed"), help="compressed artifact"
    )
    bench.add_argument(
        "--catalogue",
        metavar="SIZES",
        help="scale run on synthetic catalogues instead, e.g. 10k,100k,1m "
        "(or ITEMS:USERS:INTERACTIONS like 2k:1k:20k)",
    )
    bench.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default runs/bench, or runs/scale with --catalogue)",
    )
    bench.add_argument(
        "--repeats", type=positive_int, default=300, help="timed requests per variant at batch 1"
    )
    bench.add_argument(
        "--batch-repeats",
        type=positive_int,
        default=None,
        help="timed requests per variant at batch > 1 (default repeats / 5, at least 1)",
    )
    bench.add_argument("--warmup", type=int, default=20, help="untimed requests per setting")
    bench.add_argument("--batches", type=int_list, default=(1, 32), help="users per request (default 1,32)")
    bench.add_argument(
        "--threads",
        type=int_list,
        default=(1, 0),
        help="ORT + FAISS threads to time (0 = all CPUs; default 1,0)",
    )
    bench.add_argument("--k", type=positive_int, default=10)
    bench.add_argument("--n-candidates", type=positive_int, default=200)
    bench.add_argument("--seed", type=int, default=0)
    scale = bench.add_argument_group("with --catalogue")
    scale.add_argument(
        "--preset",
        choices=("default", "tiny"),
        default="default",
        help="model sizes: default = the teacher and the compress pipeline's student; "
        "tiny = the test presets",
    )
    scale.add_argument(
        "--train-interactions",
        type=count,
        default=None,
        help="fitted interactions one retrieval epoch samples (default 250k; tiny: all)",
    )
    scale.add_argument(
        "--ranker-users",
        type=count,
        default=None,
        help="users whose lists one ranker epoch uses (default 2k)",
    )
    scale.add_argument(
        "--embedding-min-count",
        type=int,
        default=None,
        help="compressed variant: ids with fewer fitted interactions share the fallback "
        "row (default 10; 0 keeps every row)",
    )
    scale.add_argument(
        "--index-kind",
        default=None,  # ScaleConfig checks it against slimrec.artifact.index
        help="compressed variant's IVF code: 8, 6 or 4 bits per dimension (default ivf_sq6)",
    )
    scale.add_argument(
        "--target-recall",
        type=float,
        default=0.97,
        help="recall@200 vs exact the IVF nprobe is tuned to (default 0.97)",
    )
    scale.add_argument(
        "--train-threads",
        type=int,
        default=None,
        help="torch + FAISS threads while training and building (default 1; 0 = all CPUs)",
    )
    scale.add_argument(
        "--fresh",
        action="store_true",
        help="rebuild data and models even where an earlier run left matching ones",
    )
    bench.set_defaults(run=run_bench, command="bench")


def run_bench(args) -> int:
    from slimrec.bench.timing import TimingConfig

    timing = TimingConfig(
        repeats=args.repeats,
        batch_repeats=args.batch_repeats or max(1, args.repeats // 5),
        warmup=args.warmup,
        batches=args.batches,
        threads=args.threads,
        k=args.k,
        n_candidates=args.n_candidates,
        seed=args.seed,
    )
    if args.catalogue:
        from slimrec.bench.scale import ScaleConfig, parse_sizes, run_scale

        if not 0 < args.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {args.target_recall}")
        config = ScaleConfig.for_preset(
            args.preset,
            train_interactions=args.train_interactions,
            ranker_users=args.ranker_users,
            target_recall=args.target_recall,
            embedding_min_count=args.embedding_min_count,
            index_kind=args.index_kind,
            train_threads=args.train_threads,
            seed=args.seed,
        )
        out = args.out or Path("runs/scale")
        run_scale(parse_sizes(args.catalogue), out, config, timing, fresh=args.fresh)
        return 0
    from slimrec.bench.stages import bench_artifacts, render_markdown, write_report

    report = bench_artifacts({"full": args.full, "compressed": args.compressed}, timing)
    out = args.out or Path("runs/bench")
    write_report(report, out)
    print(render_markdown(report))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return 0
