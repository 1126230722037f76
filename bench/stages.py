"""`slimrec bench`: offline per-stage latency and resident memory, full vs compressed.

    slimrec bench [--full artifacts/teacher --compressed artifacts/compressed] [--out runs/bench]
    slimrec bench --catalogue 10k,100k,1m [--out runs/scale]

The first form times two artifacts of one dataset through `ServedModel.recommend` in
this process (user tower, retrieval, ranking, total) at batch 1 and 32, with 1 thread
and all threads, the variants interleaved request by request; then loads each in a
fresh process for its resident memory. Prints a table and writes bench.json / bench.md.
The second form does the same on synthetic catalogues it generates and trains models
for (see loadtest/scale.py), and adds index build time, size and recall, plus a plot.

This is a benchmark, not a load test: no HTTP (loadtest/locustfile.py is the load test).
Imports here stay light; the handlers import the measuring code.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

VARIANTS = ("full", "compressed")


def register(subparsers) -> None:
    """Add the `bench` subcommand to slimrec's argparse subparsers."""
    bench = subparsers.add_parser("bench", help="offline latency and memory of full vs compressed "
                                                "(or across synthetic catalogue sizes)")
    bench.add_argument("--full", type=Path, default=Path("artifacts/teacher"), help="full (teacher) artifact")
    bench.add_argument("--compressed", type=Path, default=Path("artifacts/compressed"),
                       help="compressed artifact")
    bench.add_argument("--catalogue", metavar="SIZES",
                       help="scale run on synthetic catalogues instead, e.g. 10k,100k,1m "
                            "(or ITEMS:USERS:INTERACTIONS like 2k:1k:20k)")
    bench.add_argument("--out", type=Path, default=None,
                       help="output directory (default runs/bench, or runs/scale with --catalogue)")
    bench.add_argument("--repeats", type=_positive_int, default=300,
                       help="timed requests per variant at batch 1")
    bench.add_argument("--batch-repeats", type=_positive_int, default=None,
                       help="timed requests per variant at batch > 1 (default repeats / 5, at least 1)")
    bench.add_argument("--warmup", type=int, default=20, help="untimed requests per setting")
    bench.add_argument("--batches", type=_int_list, default=(1, 32), help="users per request (default 1,32)")
    bench.add_argument("--threads", type=_int_list, default=(1, 0),
                       help="ORT + FAISS threads to time (0 = all CPUs; default 1,0)")
    bench.add_argument("--k", type=_positive_int, default=10)
    bench.add_argument("--n-candidates", type=_positive_int, default=200)
    bench.add_argument("--seed", type=int, default=0)
    scale = bench.add_argument_group("with --catalogue")
    scale.add_argument("--preset", choices=("default", "tiny"), default="default",
                       help="model sizes: default = the teacher and the compress pipeline's student; "
                            "tiny = the test presets")
    scale.add_argument("--train-interactions", type=_size, default=None,
                       help="fitted interactions one retrieval epoch samples (default 250k; tiny: all)")
    scale.add_argument("--ranker-users", type=_size, default=None,
                       help="users whose lists one ranker epoch uses (default 2k)")
    scale.add_argument("--embedding-min-count", type=int, default=None,
                       help="compressed variant: ids with fewer fitted interactions share the fallback "
                            "row (default 10; 0 keeps every row)")
    scale.add_argument("--index-kind", default=None,  # ScaleConfig checks it against slimrec.artifact.index
                       help="compressed variant's IVF code: 8, 6 or 4 bits per dimension (default ivf_sq6)")
    scale.add_argument("--target-recall", type=float, default=0.97,
                       help="recall@200 vs exact the IVF nprobe is tuned to (default 0.97)")
    scale.add_argument("--train-threads", type=int, default=None,
                       help="torch + FAISS threads while training and building (default 1; 0 = all CPUs)")
    scale.add_argument("--fresh", action="store_true",
                       help="rebuild data and models even where an earlier run left matching ones")
    bench.set_defaults(run=run_bench, command="bench")


def run_bench(args) -> int:
    from slimrec.bench.timing import TimingConfig

    timing = TimingConfig(repeats=args.repeats, batch_repeats=args.batch_repeats or max(1, args.repeats // 5),
                          warmup=args.warmup, batches=args.batches, threads=args.threads, k=args.k,
                          n_candidates=args.n_candidates, seed=args.seed)
    if args.catalogue:
        from slimrec.bench.scale import ScaleConfig, parse_sizes, run_scale

        if not 0 < args.target_recall <= 1:
            raise ValueError(f"--target-recall must be in (0, 1], got {args.target_recall}")
        config = ScaleConfig.for_preset(args.preset, train_interactions=args.train_interactions,
                                        ranker_users=args.ranker_users, target_recall=args.target_recall,
                                        embedding_min_count=args.embedding_min_count,
                                        index_kind=args.index_kind,
                                        train_threads=args.train_threads, seed=args.seed)
        out = args.out or Path("runs/scale")
        run_scale(parse_sizes(args.catalogue), out, config, timing, fresh=args.fresh)
        return 0
    report = bench_artifacts({"full": args.full, "compressed": args.compressed}, timing)
    out = args.out or Path("runs/bench")
    write_report(report, out)
    print(render_markdown(report))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", file=sys.stderr)
    return 0


def bench_artifacts(paths: dict[str, Path], timing) -> dict:
    """Latency (interleaved) and resident memory of each variant; ratios compressed / full."""
    from slimrec.artifact import load_artifact
    from slimrec.bench.timing import machine, ratios, resident_memory, time_variants

    for name, path in paths.items():
        if not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(f"--{name} {path}: no artifact there (manifest.json missing); "
                                    f"train one (`slimrec train` / `slimrec compress`) or pass its directory")
    artifacts = {name: load_artifact(path) for name, path in paths.items()}
    before = machine()
    load_before = before.pop("loadavg")
    started = time.perf_counter()
    latency = time_variants(artifacts, timing, progress=lambda msg: print(f"bench: {msg}", file=sys.stderr))
    memory = {}
    for name, path in paths.items():
        print(f"bench: resident memory of {name}", file=sys.stderr)
        memory[name] = resident_memory(path)
    variants = {name: {"artifact": str(paths[name]), **describe(art), "memory": memory[name]}
                for name, art in artifacts.items()}
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**before, "loadavg_before": load_before, "loadavg_after": machine()["loadavg"]},
        "seconds": time.perf_counter() - started,
        "settings": timing.to_dict(),
        "variants": variants,
        "latency": latency,
        "ratios": ratios(latency),
        "memory_ratio": memory["compressed"]["resident_bytes"] / max(1, memory["full"]["resident_bytes"])
        if set(memory) >= set(VARIANTS) else None,
    }


def describe(artifact) -> dict:
    """The served model's shape: catalogue, index, embedding width, bytes on disk."""
    entry = artifact.config["models"][""]
    files = artifact.manifest["files"]
    return {"variant_tag": artifact.variant, "n_items": artifact.config["feature_space"]["n_items"],
            "n_users": artifact.config["feature_space"]["n_users"], "index": entry["index"],
            "embedding_dim": entry.get("embedding_dim"), "served_bytes": artifact.served_bytes(),
            "index_bytes": files["items.faiss"]["bytes"],
            "onnx_bytes": {k: files[k]["bytes"] for k in ("user_tower.onnx", "ranker.onnx")}}


def write_report(report: dict, out: Path, stem: str = "bench") -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(report) + "\n")


# --- rendering --------------------------------------------------------------------------------


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# slimrec bench: full vs compressed, offline (ServedModel.recommend, no HTTP)", "",
             f"{m['cpu'] or 'CPU'}, {m['cpus']} CPUs; load average (1/5/15 min) "
             f"{_load(m['loadavg_before'])} before, {_load(m['loadavg_after'])} after. "
             f"k={report['settings']['k']} of {report['settings']['n_candidates']} candidates; "
             f"{report['settings']['repeats']} requests at batch 1, {report['settings']['batch_repeats']} "
             f"at larger batches, variants interleaved.", ""]
    for name, v in report["variants"].items():
        index = v["index"]
        depth = f", nprobe {index['nprobe']}, nlist {index['nlist']}" if index["kind"] != "flat" else ""
        lines.append(f"- **{name}**: `{v['artifact']}`: {v['n_items']:,} items, d={v['embedding_dim']}, "
                     f"index {index['kind']}{depth} ({_mib(v['index_bytes'])}), "
                     f"served files {_mib(v['served_bytes'])}")
    lines += ["", *latency_table(report["latency"], report["ratios"]), "", *memory_table(report)]
    return "\n".join(lines)


def latency_table(latency: list[dict], ratio_rows: list[dict]) -> list[str]:
    """Markdown rows: per (batch, threads), each variant's median / p99 ms per stage, then the ratio."""
    from slimrec.bench.timing import STAGES

    lines = ["## Latency per request, ms: median / p99", "",
             "| batch | threads | variant | " + " | ".join(STAGE_NAMES[s] for s in STAGES) + " |",
             "|---:|---:|---|" + "---:|" * len(STAGES)]
    ratio_of = {(r["batch"], r["threads"]): r for r in ratio_rows}
    keys = list(dict.fromkeys((r["batch"], r["threads"]) for r in latency))
    for batch, threads in keys:
        for row in (r for r in latency if (r["batch"], r["threads"]) == (batch, threads)):
            cells = [_median_p99(row["stages"][s]) for s in STAGES]
            lines.append(f"| {batch} | {threads} | {row['variant']} | " + " | ".join(cells) + " |")
        if (batch, threads) in ratio_of:
            r = ratio_of[(batch, threads)]["stages"]
            cells = [f"{r[s]['median']:.2f}x / {r[s]['p99']:.2f}x" for s in STAGES]
            lines.append(f"| {batch} | {threads} | *compressed / full* | " + " | ".join(cells) + " |")
    return lines


STAGE_NAMES = {"embed": "user tower", "retrieve": "retrieval", "rank": "ranking", "total": "total"}


def memory_table(report: dict) -> list[str]:
    lines = ["## Resident memory (RSS growth of a fresh process loading the ServedModel)", "",
             "| variant | resident | load time | served files |", "|---|---:|---:|---:|"]
    for name, v in report["variants"].items():
        mem = v["memory"]
        lines.append(f"| {name} | {_mib(mem['resident_bytes'])} | {mem['load_seconds']:.2f} s "
                     f"| {_mib(v['served_bytes'])} |")
    if report.get("memory_ratio") is not None:
        served = report["variants"]["compressed"]["served_bytes"] / report["variants"]["full"]["served_bytes"]
        lines.append(f"| *compressed / full* | {report['memory_ratio']:.2f}x | | {served:.2f}x |")
    return lines


def _median_p99(stage: dict) -> str:
    return f"{stage['median_ms']:.3f} / {stage['p99_ms']:.3f}"


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _load(values) -> str:
    return "/".join(f"{v:.2f}" for v in values)


# --- argument types ---------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 0, got {text!r}")
    return values


def parse_count(text: str) -> int:
    """'2k' -> 2000, '1m' -> 1000000, '500000' -> 500000 (k/m suffixes, case-insensitive)."""
    t = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(t[-1:], 1)
    number = t[:-1] if scale > 1 else t
    try:
        value = float(number) * scale
    except ValueError:
        raise ValueError(f"expected a count like 10k, 1m or 5000, got {text!r}") from None
    if value < 1 or value != int(value):
        raise ValueError(f"expected a positive whole count, got {text!r}")
    return int(value)


def _size(text: str) -> int:
    try:
        return parse_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
