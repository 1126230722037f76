"""`slimrec bench` of two artifacts: offline per-stage latency and resident memory, full vs compressed.

Times two artifacts of one dataset through `ServedModel.recommend` in this process
(user tower, retrieval, ranking, total) at batch 1 and 32, with 1 thread and all
threads, the variants interleaved request by request; then loads each in a fresh
process for its resident memory. Writes bench.json / bench.md. The scale run
(bench/scale.py) does the same for the artifacts it builds per catalogue size.

This is a benchmark, not a load test: no HTTP (loadtest/locustfile.py is the load test).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from slimrec.bench.figures import STAGE_NAMES, load_averages, median_p99, mib
from slimrec.bench.progress import log

VARIANTS = ("full", "compressed")


def bench_artifacts(paths: dict[str, Path], timing) -> dict:
    """Latency (interleaved) and resident memory of each variant; ratios compressed / full."""
    from slimrec.artifact import load_artifact
    from slimrec.bench.timing import machine, ratios, resident_memory, time_variants

    for name, path in paths.items():
        if not (Path(path) / "manifest.json").is_file():
            raise FileNotFoundError(
                f"--{name} {path}: no artifact there (manifest.json missing); "
                f"train one (`slimrec train` / `slimrec compress`) or pass its directory"
            )
    artifacts = {name: load_artifact(path) for name, path in paths.items()}
    before = machine()
    load_before = before.pop("loadavg")
    started = time.perf_counter()
    latency = time_variants(artifacts, timing, progress=log)
    memory = {}
    for name, path in paths.items():
        log(f"resident memory of {name}")
        memory[name] = resident_memory(path)
    variants = {
        name: {"artifact": str(paths[name]), **describe(art), "memory": memory[name]}
        for name, art in artifacts.items()
    }
    return {
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {**before, "loadavg_before": load_before, "loadavg_after": machine()["loadavg"]},
        "seconds": time.perf_counter() - started,
        "settings": timing.to_dict(),
        "variants": variants,
        "latency": latency,
        "ratios": ratios(latency),
        "memory_ratio": memory["compressed"]["resident_bytes"] / max(1, memory["full"]["resident_bytes"])
        if set(memory) >= set(VARIANTS)
        else None,
    }


def describe(artifact) -> dict:
    """The served model's shape: catalogue, index, embedding width, bytes on disk."""
    entry = artifact.config["models"][""]
    files = artifact.manifest["files"]
    return {
        "variant_tag": artifact.variant,
        "n_items": artifact.config["feature_space"]["n_items"],
        "n_users": artifact.config["feature_space"]["n_users"],
        "index": entry["index"],
        "embedding_dim": entry.get("embedding_dim"),
        "served_bytes": artifact.served_bytes(),
        "index_bytes": files["items.faiss"]["bytes"],
        "onnx_bytes": {k: files[k]["bytes"] for k in ("user_tower.onnx", "ranker.onnx")},
    }


def write_report(report: dict, out: Path, stem: str = "bench") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(render_markdown(report) + "\n")


# --- rendering --------------------------------------------------------------------------------


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# slimrec bench: full vs compressed, offline (ServedModel.recommend, no HTTP)",
        "",
        f"{m['cpu'] or 'CPU'}, {m['cpus']} CPUs; load average (1/5/15 min) "
        f"{load_averages(m['loadavg_before'])} before, {load_averages(m['loadavg_after'])} after. "
        f"k={report['settings']['k']} of {report['settings']['n_candidates']} candidates; "
        f"{report['settings']['repeats']} requests at batch 1, {report['settings']['batch_repeats']} "
        f"at larger batches, variants interleaved.",
        "",
    ]
    for name, v in report["variants"].items():
        index = v["index"]
        depth = f", nprobe {index['nprobe']}, nlist {index['nlist']}" if index["kind"] != "flat" else ""
        lines.append(
            f"- **{name}**: `{v['artifact']}`: {v['n_items']:,} items, d={v['embedding_dim']}, "
            f"index {index['kind']}{depth} ({mib(v['index_bytes'])}), "
            f"served files {mib(v['served_bytes'])}"
        )
    lines += ["", *latency_table(report["latency"], report["ratios"]), "", *memory_table(report)]
    return "\n".join(lines)


def latency_table(latency: list[dict], ratio_rows: list[dict]) -> list[str]:
    """Markdown rows: per (batch, threads), each variant's median / p99 ms per stage, then the ratio."""
    from slimrec.bench.timing import STAGES

    lines = [
        "## Latency per request, ms: median / p99",
        "",
        "| batch | threads | variant | " + " | ".join(STAGE_NAMES[s] for s in STAGES) + " |",
        "|---:|---:|---|" + "---:|" * len(STAGES),
    ]
    ratio_of = {(r["batch"], r["threads"]): r for r in ratio_rows}
    keys = list(dict.fromkeys((r["batch"], r["threads"]) for r in latency))
    for batch, threads in keys:
        for row in (r for r in latency if (r["batch"], r["threads"]) == (batch, threads)):
            cells = [median_p99(row["stages"][s]) for s in STAGES]
            lines.append(f"| {batch} | {threads} | {row['variant']} | " + " | ".join(cells) + " |")
        if (batch, threads) in ratio_of:
            r = ratio_of[(batch, threads)]["stages"]
            cells = [f"{r[s]['median']:.2f}x / {r[s]['p99']:.2f}x" for s in STAGES]
            lines.append(f"| {batch} | {threads} | *compressed / full* | " + " | ".join(cells) + " |")
    return lines


def memory_table(report: dict) -> list[str]:
    lines = [
        "## Resident memory (RSS growth of a fresh process loading the ServedModel)",
        "",
        "| variant | resident | load time | served files |",
        "|---|---:|---:|---:|",
    ]
    for name, v in report["variants"].items():
        mem = v["memory"]
        lines.append(
            f"| {name} | {mib(mem['resident_bytes'])} | {mem['load_seconds']:.2f} s "
            f"| {mib(v['served_bytes'])} |"
        )
    if report.get("memory_ratio") is not None:
        served = report["variants"]["compressed"]["served_bytes"] / report["variants"]["full"]["served_bytes"]
        lines.append(f"| *compressed / full* | {report['memory_ratio']:.2f}x | | {served:.2f}x |")
    return lines
