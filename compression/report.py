"""The compression report: size, parameters, latency and quality per stage, measured in one run.

Latency is the offline per-request path of `ServedModel.recommend` (user tower ->
index top-N -> ranker -> top-10, N the stage's candidate budget: 200 unless chosen on
validation) at batch 1 and 1 thread, all stages interleaved request by request so
machine noise hits them alike.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
from slimrec.artifact import Artifact, amend_artifact
from slimrec.artifact.index import IndexSpec, build_item_index, recall_at_k
from slimrec.artifact.runtime import ServedModel, candidate_budget
from slimrec.compression.gate import GateConfig, gate
from slimrec.compression.report_render import render_markdown, render_plot
from slimrec.compression.tune_candidates import at_budget
from slimrec.models.data import Dataset
from slimrec.models.movielens import load_dataset
from slimrec.models.served_eval import item_vectors
from slimrec.models.split import TEST, protocol_split
from tqdm import tqdm

SERVED_PARTS = {"user_tower.onnx": "user tower", "ranker.onnx": "ranker", "items.faiss": "index"}
DATA_PARTS = {"tables.safetensors": "user data", "catalogue.json": "catalogue"}
METRICS = ("ndcg@10", "recall@10", "recall@50", "recall@200", "hr@10", "mrr@10")


def stage_sizes(artifacts: dict[str, Artifact]) -> dict[str, dict]:
    """Bytes on disk of each stage's served parts (model: towers, ranker, index; data: user tables)."""
    out = {}
    for stage, art in artifacts.items():
        files = art.manifest["files"]
        parts = {label: files[rel]["bytes"] for rel, label in {**SERVED_PARTS, **DATA_PARTS}.items()}
        model = sum(files[rel]["bytes"] for rel in SERVED_PARTS)
        entry = art.config["models"][""]
        out[stage] = {
            "parts": parts,
            "model_bytes": model,
            "served_bytes": art.served_bytes(),
            "parameters": entry.get("parameters", {}),
            "index": entry["index"],
            "memory_bytes": resident_bytes(art.path),
        }
    return out


def resident_bytes(path) -> int:
    """RSS growth of a fresh process when it loads the served model (ONNX sessions, index, tables)."""
    code = (
        "import gc, psutil, sys\n"
        "from slimrec.artifact import load_artifact\n"
        "from slimrec.artifact.runtime import ServedModel\n"
        "art = load_artifact(sys.argv[1]); gc.collect(); p = psutil.Process(); before = p.memory_info().rss\n"
        "m = ServedModel(art); gc.collect(); print(p.memory_info().rss - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300
    )
    if result.returncode != 0:  # a broken probe must not pass for "no memory"
        raise RuntimeError(f"measuring the resident memory of {path} failed: {result.stderr.strip()[-500:]}")
    return int(result.stdout.strip())


def measure_latency(
    artifacts: dict[str, Artifact], dataset: Dataset, n_requests: int = 300, warmup: int = 20, seed: int = 0
) -> dict[str, dict]:
    """Per-request latency of every stage's served model over the same test users, interleaved."""
    split = protocol_split(dataset)
    users = np.unique(split.user[split.fold == TEST])
    sample = np.random.default_rng(seed).choice(users, size=n_requests + warmup, replace=True)
    models = {stage: ServedModel(art, threads=1) for stage, art in artifacts.items()}
    times: dict[str, dict[str, list[float]]] = {
        stage: {"total": [], "embed": [], "retrieve": [], "rank": []} for stage in models
    }
    for i, user in enumerate(tqdm(sample, desc="latency (all stages)", file=sys.stderr, disable=None)):
        for stage, model in models.items():
            t0 = time.perf_counter()
            rec = model.recommend(model.known_users(np.array([user])), k=10)  # at the stage's budget
            elapsed = time.perf_counter() - t0
            if i >= warmup:
                times[stage]["total"].append(elapsed)
                for part, seconds in rec.timings.items():
                    times[stage][part].append(seconds)
    return {
        stage: {
            f"{part}_{q}_ms": float(np.percentile(v, p)) * 1e3
            for part, v in parts.items()
            for q, p in (("p50", 50), ("p99", 99))
        }
        | {"requests": n_requests}
        for stage, parts in times.items()
    }


def index_recall(art: Artifact, dataset: Dataset, k: int = 200) -> float:
    """recall@k of the served index against exact search over the item tower's vectors (test users)."""
    model = ServedModel(art)
    split = protocol_split(dataset)
    users = np.unique(split.user[split.fold == TEST])
    queries = model.embed(model.known_users(users, exclude_seen=False))
    exact = build_item_index(item_vectors(model), IndexSpec("flat")).search(queries, k)[1]
    return recall_at_k(model.index.search(queries, k)[1], exact)


def build_rows(artifacts, sizes, latency, dataset) -> list[dict]:
    rows = []
    for stage, art in artifacts.items():
        metrics = art.read_json("metrics.json")
        rows.append(
            {
                "stage": stage,
                "n_candidates": candidate_budget(art),
                **sizes[stage],
                **latency[stage],
                "index_recall@200": index_recall(art, dataset),
                "bytes_per_item_index": sizes[stage]["parts"]["index"]
                / art.config["feature_space"]["n_items"],
                "two_stage": metrics["two_stage"],
                "history_only": metrics.get("history_only", {}),
                "retrieval": metrics["retrieval"],
                "ranker": metrics.get("ranker", {}),
            }
        )
    return rows


def history_only_ratio(row: dict) -> float | None:
    """Test NDCG@10 of the stage's users sent as new users over theirs as known users."""
    new = row.get("history_only", {}).get("test", {}).get("ndcg@10")
    return None if new is None else new / row["two_stage"]["test"]["ndcg@10"]


def write_report(
    out,
    artifacts: dict[str, Artifact],
    sizes,
    latency,
    gate_config: GateConfig,
    timing: dict | None = None,
    dataset: Dataset | None = None,
) -> dict:
    """report.md / report.json / report.png into the compressed artifact; records `promotable`.

    `dataset`: the data the stages were scored on (default: loaded from the teacher's source,
    a path that may be relative to where the teacher was trained).
    """
    dataset_name = artifacts["teacher"].manifest["data"].get("dataset")
    if dataset is None:
        dataset = load_dataset(artifacts["teacher"].manifest["data"].get("source") or dataset_name)
    rows = build_rows(artifacts, sizes, latency, dataset)
    teacher = next(r for r in rows if r["stage"] == "teacher")
    final = rows[-1]
    # The compressed model is gated as served: K=10 metrics at its candidate budget.
    serving = artifacts[final["stage"]].manifest.get("serving")
    served = {fold: at_budget(final["two_stage"][fold], serving, fold) for fold in ("valid", "test")}
    failures = gate({"two_stage": teacher["two_stage"]}, {"two_stage": served}, gate_config)
    ratios = {
        "model_bytes": final["model_bytes"] / teacher["model_bytes"],
        "served_bytes": final["served_bytes"] / teacher["served_bytes"],
        "memory_bytes": final["memory_bytes"] / max(1, teacher["memory_bytes"]),
        "latency_p50": final["total_p50_ms"] / teacher["total_p50_ms"],
        "latency_p99": final["total_p99_ms"] / teacher["total_p99_ms"],
        **{
            f"test_{m}": final["two_stage"]["test"][m] / teacher["two_stage"]["test"][m]
            for m in ("ndcg@10", "recall@200")
        },
        "test_ndcg@10_at_budget": served["test"]["ndcg@10"] / teacher["two_stage"]["test"]["ndcg@10"],
        # New users served from their history alone, against the same users known (test NDCG@10).
        **{
            f"{stage}_history_only_ndcg@10": ratio
            for stage, row in (("teacher", teacher), ("compressed", final))
            if (ratio := history_only_ratio(row)) is not None
        },
    }
    report = {
        "dataset": dataset_name,
        "split": "PROTOCOL.md",
        "rows": rows,
        "ratios": ratios,
        "candidates": serving or {},  # the ranker's candidate budget and what it was chosen on
        "gate": {
            "tolerance": gate_config.tolerance,
            "metrics": list(gate_config.metrics),
            "n_candidates": (serving or {}).get("n_candidates", final["n_candidates"]),
            "failures": failures,
            "promotable": not failures,
        },
        "timing": timing or {},  # wall, CPU seconds and peak RSS per stage of `slimrec compress`
    }
    amend_artifact(
        out,
        files={
            "report.json": (json.dumps(report, indent=2, default=float).encode(), "offline"),
            "report.md": (render_markdown(report).encode(), "offline"),
            "report.png": (render_plot(report), "offline"),
        },
        fields={"promotable": not failures},
    )
    return report
