"""`slimrec quality`: test quality over seeds, and the compressed variant against its teacher, paired.

    slimrec quality --data ml-100k --seeds 0,1,2 [--out runs/quality]

For each seed it trains the teacher and compresses it (`slimrec train --seed S`, `slimrec
compress --seed S`; artifacts left by an earlier run with the same settings are reused), then:
  - each variant's test metrics (PROTOCOL.md, two-stage, known and history-only users): the mean
    over seeds and its 95% t-interval;
  - compressed vs teacher over users: per-user test NDCG@10, averaged over seeds, differenced
    and bootstrapped (models/significance.py), with the verdict (beats / matches / loses /
    inconclusive at the gate's tolerance);
  - new users: history-only vs known NDCG@10 per variant, as a ratio of seed means.
Writes quality.json and quality.md under --out and prints the table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from slimrec.bench.argtypes import int_list

VARIANTS = ("teacher", "compressed")
METRICS = ("ndcg@10", "recall@10", "recall@200", "mrr@10")


def register(subparsers) -> None:
    quality = subparsers.add_parser(
        "quality", help="test quality over seeds (mean, 95%% interval) and compressed vs teacher, paired"
    )
    quality.add_argument("--data", default="ml-100k", help="dataset name or directory (default ml-100k)")
    quality.add_argument("--seeds", type=int_list, default=(0, 1, 2), help="comma-separated (default 0,1,2)")
    quality.add_argument("--out", type=Path, default=Path("runs/quality"))
    quality.add_argument(
        "--preset", default=None, help="training preset (default: the dataset's, as `slimrec train` takes)"
    )
    quality.add_argument(
        "--compress-preset",
        default=None,
        help="compression preset (default: the teacher's, as `slimrec compress` takes)",
    )
    quality.add_argument("--threads", type=int, default=None, help="torch threads (default all CPUs)")
    quality.set_defaults(run=run_quality, command="quality")


def run_quality(args) -> int:
    if len(set(args.seeds)) != len(args.seeds):
        raise ValueError(f"--seeds repeats a seed: {','.join(map(str, args.seeds))}")
    resolve_presets(args)
    print(f"presets: train {args.preset}, compress {args.compress_preset}", flush=True)
    runs = {seed: build_seed(args, seed) for seed in args.seeds}
    report = quality_report(runs, args.data)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    text = render_markdown(report)
    (args.out / "quality.md").write_text(text)
    print(text)
    return 0


def resolve_presets(args) -> None:
    """Fill the presets left out with those `slimrec train` and `slimrec compress` would take, so
    that a bare `slimrec quality --data D` measures the default road."""
    from slimrec.compression.presets import preset_for_teacher
    from slimrec.models.presets import default_preset, train_config

    args.preset = args.preset or default_preset(args.data)
    if args.compress_preset is None:
        args.compress_preset = preset_for_teacher(train_config(args.preset).to_dict(), args.preset)


def build_seed(args, seed: int) -> dict[str, Path]:
    """The seed's teacher and compressed artifacts, trained and compressed unless already there.

    Each step is its own `slimrec` process: one seed's models leave no memory behind for the next.
    """
    paths = {name: args.out / f"seed-{seed}" / name for name in VARIANTS}
    common = ["--seed", str(seed)] + ([] if args.threads is None else ["--threads", str(args.threads)])
    steps = {
        "teacher": ["train", "--data", str(args.data), "--preset", args.preset],
        "compressed": ["compress", "--teacher", str(paths["teacher"]), "--preset", args.compress_preset],
    }
    for name in VARIANTS:
        if reusable(paths[name], seed, args):
            print(f"seed {seed}: reusing {paths[name]}", flush=True)
            continue
        step = [*steps[name], "--out", str(paths[name]), *common]
        print(f"\n$ slimrec {' '.join(step)}", flush=True)
        code = subprocess.run([sys.executable, "-m", "slimrec.cli", *step]).returncode
        if code not in (0, 1):  # 1: the gate said no; the figures are still what we came for
            raise RuntimeError(f"seed {seed}: slimrec {step[0]} exited with {code}")
    return paths


def reusable(path: Path, seed: int, args) -> bool:
    """An artifact an earlier run left here with the very config this run would use."""
    from slimrec.artifact import ArtifactError, load_artifact
    from slimrec.compression.presets import compress_config
    from slimrec.models.presets import train_config

    if not (path / "manifest.json").exists():
        return False
    try:
        config = load_artifact(path).config
    except ArtifactError:
        return False
    if "pipeline" in config:
        expected = compress_config(args.compress_preset, None)
        expected.seed = seed
        return config["pipeline"] == json.loads(json.dumps(expected.to_dict()))
    return config["train"] == json.loads(json.dumps(train_config(args.preset, seed=seed).to_dict()))


def quality_report(runs: dict[int, dict[str, Path]], data: str) -> dict:
    from slimrec.artifact import load_artifact
    from slimrec.artifact.runtime import ServedModel
    from slimrec.models.movielens import load_dataset
    from slimrec.models.served_eval import per_user_ndcg
    from slimrec.models.significance import paired_difference, seed_interval, verdict
    from slimrec.models.split import TEST

    dataset = load_dataset(data)
    metrics = {v: [load_artifact(p[v]).read_json("metrics.json") for p in runs.values()] for v in VARIANTS}
    per_user = {}
    for variant in VARIANTS:
        for new in (False, True):
            values = []
            for paths in runs.values():
                model = ServedModel(load_artifact(paths[variant]))
                values.append(per_user_ndcg(model, dataset, TEST, as_new_users=new)[1])
            per_user[variant, new] = np.mean(values, axis=0)  # each user's figure averaged over seeds
    tolerance = gate_tolerance(next(iter(runs.values()))["compressed"])
    difference = paired_difference(per_user["teacher", False], per_user["compressed", False])
    teacher_mean = float(per_user["teacher", False].mean())
    return {
        "dataset": dataset.name,
        "seeds": list(runs),
        "split": "PROTOCOL.md, test fold",
        "variants": {
            v: {
                stage: {
                    m: seed_interval([r[stage]["test"][m] for r in metrics[v]]).to_dict() for m in METRICS
                }
                for stage in ("two_stage", "history_only")
            }
            for v in VARIANTS
        },
        "paired": {
            "metric": "two-stage test NDCG@10 per user, averaged over seeds: compressed - teacher",
            "users": len(per_user["teacher", False]),
            "difference": difference.to_dict(),
            "tolerance": tolerance,
            "verdict": verdict(difference, teacher_mean, tolerance),
        },
        "new_users": {v: float(per_user[v, True].mean() / per_user[v, False].mean()) for v in VARIANTS},
    }


def gate_tolerance(compressed: Path) -> float:
    from slimrec.compression.gate import GateConfig

    report = compressed / "report.json"
    if report.exists():
        return float(json.loads(report.read_text())["gate"]["tolerance"])
    return GateConfig().tolerance


def render_markdown(report: dict) -> str:
    seeds = ",".join(map(str, report["seeds"]))
    lines = [
        f"# Quality over seeds {seeds}: {report['dataset']}, {report['split']}",
        "",
        "Mean over seeds [95% t-interval].",
        "",
        "| variant | users | " + " | ".join(METRICS) + " |",
        "|---|---|" + "---|" * len(METRICS),
    ]
    for variant, stages in report["variants"].items():
        for stage, label in (("two_stage", "known"), ("history_only", "history only")):
            cells = [_interval(stages[stage][m]) for m in METRICS]
            lines.append(f"| {variant} | {label} | " + " | ".join(cells) + " |")
    paired = report["paired"]
    d = paired["difference"]
    lines += [
        "",
        f"Paired over {paired['users']} users ({paired['metric']}): "
        f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] (95% BCa bootstrap) -> "
        f"**{paired['verdict']}** (tolerance {paired['tolerance']:g} x the teacher's mean)",
        "",
        "New users (history only) / known users, NDCG@10: "
        + ", ".join(f"{v} {r:.3f}x" for v, r in report["new_users"].items()),
        "",
    ]
    return "\n".join(lines)


def _interval(i: dict) -> str:
    if i["n"] < 2:
        return f"{i['mean']:.4f}"
    return f"{i['mean']:.4f} [{i['low']:.4f}, {i['high']:.4f}]"
