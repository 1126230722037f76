"""`slimrec bench --catalogue 10k,100k,1m`: full vs compressed as the catalogue grows.

Per size, under <out>/<size>/:
    data/         synthetic interactions (models/synth.py, as `slimrec data synth` writes them)
    full/         the teacher (two-tower + DCN ranker, TrainConfig defaults) with an exact flat
                  index, d = the teacher's out_dim
    compressed/   a student distilled from it, int8 embedding tables + ONNX Runtime dynamic int8
                  dense layers, IVF-SQ6 index (`--index-kind`) with nprobe tuned on the student's
                  embeddings to a recall@200 target against exact search (held-out users report the recall)
    build.json    shapes, seconds per step, index build time and bytes, recall, sanity metrics
    bench.json, bench.md   `slimrec bench` of the two artifacts
and in <out>: scale.json, scale.md, scale.png (latency and memory vs catalogue size, log-log).

Training is short but real, and sized for a shared 2-vCPU machine: one retrieval epoch over
a random sample of the fitted interactions (every fitted item keeps its own id row, so
embeddings and index structure cover the catalogue), one ranker epoch on the lists of a
sample of users (`RankerData.max_users`), then the student the same way, distilled with
`teacher_candidates=0` (a teacher top-M over a million items per batch costs more than
the step), its ranker over its own candidates. Each variant's blend weight, and the compressed
ranker's candidate budget (`slimrec compress`'s rule), are chosen on the tuning users. No
PROTOCOL evaluation at scale (the quality figures come from ml-100k): only the index's
recall@200 and a two-stage recall@10 on other users as a sanity check.
Nothing here builds an [n_users, n_items] matrix: exact search runs in FAISS on sampled
users, and training's exact top-k scores users in blocks sized to the catalogue.
An earlier run's data and artifacts are reused when their parameters match (`--fresh` rebuilds).
"""

from __future__ import annotations

import gc
import json
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from slimrec.bench.argtypes import parse_count
from slimrec.bench.progress import Clock, log
from slimrec.bench.scale_config import ScaleConfig
from slimrec.bench.stages import bench_artifacts, write_report

# (items, users, interactions) of the sizes the scale run is tuned for; others interpolate log-log.
SHAPES = (
    (2_000, 1_000, 20_000),
    (10_000, 20_000, 500_000),
    (100_000, 50_000, 2_000_000),
    (1_000_000, 200_000, 10_000_000),
)
MIN_PER_USER = 5  # models.synth.MIN_PER_USER, checked before anything long starts


# --- sizes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogueSize:
    label: str
    n_items: int
    n_users: int
    n_interactions: int


def default_shape(n_items: int) -> tuple[int, int]:
    """(users, interactions) for a catalogue of n_items, interpolated log-log between SHAPES."""
    x = np.log([s[0] for s in SHAPES])
    users = np.exp(np.interp(np.log(n_items), x, np.log([s[1] for s in SHAPES])))
    interactions = np.exp(np.interp(np.log(n_items), x, np.log([s[2] for s in SHAPES])))
    return int(round(users)), int(round(interactions))


def parse_sizes(text: str) -> list[CatalogueSize]:
    """'10k,100k,1m' or 'ITEMS:USERS:INTERACTIONS' entries like '2k:1k:20k'; checked for synth."""
    sizes = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        fields = part.split(":")
        if len(fields) == 1:
            n_items = parse_count(fields[0])
            n_users, n_interactions = default_shape(n_items)
        elif len(fields) == 3:
            n_items, n_users, n_interactions = (parse_count(f) for f in fields)
        else:
            raise ValueError(
                f"--catalogue entry {part!r}: expected ITEMS (e.g. 100k) "
                "or ITEMS:USERS:INTERACTIONS (e.g. 2k:1k:20k)"
            )
        cap = max(MIN_PER_USER, n_items // 2)
        if not MIN_PER_USER * n_users <= n_interactions <= cap * n_users:
            raise ValueError(
                f"--catalogue entry {part!r}: {n_interactions:,} interactions for "
                f"{n_users:,} users must lie in [{MIN_PER_USER * n_users:,}, {cap * n_users:,}]"
            )
        sizes.append(CatalogueSize(part.lower().replace(":", "-"), n_items, n_users, n_interactions))
    if not sizes:
        raise ValueError("--catalogue: no sizes given (e.g. --catalogue 10k,100k,1m)")
    labels = [s.label for s in sizes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--catalogue: duplicate sizes in {text!r}")
    return sizes


# --- one size -----------------------------------------------------------------------------------


def build_size(size: CatalogueSize, work: Path, config: ScaleConfig, fresh: bool = False) -> dict:
    """Data, teacher, student, indexes and both artifacts for one size; returns build.json's content."""
    # Round-tripped through JSON (tuples become lists) so it compares equal to a build.json's.
    params = json.loads(json.dumps({"size": asdict(size), "config": config.to_dict()}))
    previous = None if fresh else earlier_build(work, params)
    if previous is not None:
        log(f"{size.label}: reusing the data and artifacts in {work} (--fresh rebuilds)")
        return previous
    result = build_fresh(size, work, config, params, fresh)
    (work / "build.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def earlier_build(work: Path, params: dict) -> dict | None:
    """The build.json an earlier run left in `work`, if its artifacts are there and `params` would
    build them again (`same_build`)."""
    record = work / "build.json"
    built = all((work / v / "manifest.json").is_file() for v in ("full", "compressed"))
    if not (built and record.is_file()):
        return None
    previous = json.loads(record.read_text())
    return previous if same_build(previous, params) else None


def build_fresh(size: CatalogueSize, work: Path, config: ScaleConfig, params: dict, fresh: bool) -> dict:
    """Synthesize (or reuse) the data, train, tune, write and check both artifacts; build.json's content."""
    import faiss
    import torch
    from slimrec.artifact.index import IndexSpec
    from slimrec.bench.scale_models import (
        build_indexes,
        choose_candidate_budget_,
        choose_retrieval_weight_,
        served_checks,
        shape_summary,
        stage_summary,
        train_models,
        training_view,
        write_served,
    )
    from slimrec.bench.timing import all_cpus
    from slimrec.compression.pipeline import PipelineConfig
    from slimrec.models.features import build_feature_space
    from slimrec.models.fold import FIT_TRAIN_VALID, Fold
    from slimrec.models.movielens import load_dataset
    from slimrec.models.split import protocol_split

    threads = config.train_threads or all_cpus()
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    rng = np.random.default_rng(config.seed)
    clock = Clock()
    data_dir = synthesize(size, work / "data", config.seed, fresh)
    clock.lap("synth")
    dataset = load_dataset(data_dir)
    split = protocol_split(dataset)
    train_config = config.train_config()
    space = build_feature_space(dataset, train_config.history_len)
    fold = Fold.create(FIT_TRAIN_VALID, dataset, split, space)
    sample = training_view(fold, config.train_interactions, rng)
    clock.lap("load_split")
    log(
        f"{size.label}: {dataset.n_items:,} items, {dataset.n_users:,} users, "
        f"{len(fold.fit_positions):,} fitted interactions; one retrieval epoch = "
        f"{len(sample.fit_positions):,} of them"
    )

    teacher, student = train_models(fold, sample, train_config, config, clock)
    users = rng.permutation(fold.eval_users)  # disjoint samples: tune nprobe on some, report recall on others
    tune_users = users[: config.tune_users]
    recall_users = users[config.tune_users : config.tune_users + config.recall_users]
    blend_weights = {
        variant: choose_retrieval_weight_(models, tune_users, config.retrieval_weights)
        for variant, models in (("full", teacher), ("compressed", student))
    }
    log(
        "blend weight of the retrieval score (tuning users' NDCG@10): "
        + ", ".join(f"{v} {b['chosen']}" for v, b in blend_weights.items())
    )
    clock.lap("blend_weight")
    spec, index_info = build_indexes(teacher, student, fold, tune_users, config, clock)

    data = {
        "dataset": dataset.name,
        "source": str(data_dir),
        "fingerprint": dataset.fingerprint(),
        "split_fingerprint": split.fingerprint(),
    }
    meta = {"train": train_config.to_dict(), "scale": params}
    write_served(work / "full", "full", teacher, IndexSpec("flat"), None, data, meta)
    clock.lap("write_full")
    pipeline = PipelineConfig()
    steps = {
        "distill": config.distill_config().to_dict(),
        "embeddings": pipeline.embeddings.to_dict(),
        "dense": pipeline.dense.to_dict(),
    }
    write_served(
        work / "compressed", "compressed", student, spec, pipeline.dense, data, {**meta, "pipeline": steps}
    )
    clock.lap("write_compressed")
    budget = choose_candidate_budget_(work / "compressed", dataset, split, tune_users, threads)
    clock.lap("candidate_budget")
    checks = served_checks(work, dataset, split, recall_users, threads, config.recall_tolerance)
    clock.lap("recall_sanity")
    return {
        "params": params,
        "shape": shape_summary(dataset, fold, sample, student),
        "training": {
            name: stage_summary(stage)
            for name, stage in (
                ("teacher_retrieval", teacher.retrieval),
                ("teacher_ranker", teacher.ranking),
                ("student_retrieval", student.retrieval),
                ("student_ranker", student.ranking),
            )
        },
        "index": index_info,
        "blend_weight": blend_weights,
        "candidate_budget": budget,
        **checks,
        "seconds": clock.seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def same_build(previous: dict, params: dict) -> bool:
    """Would `params` build what `previous` (a build.json) holds?

    Equal parameters, except that the nprobe grid may differ where it cannot matter: the
    earlier tuning reached its target, and the grid it walked is a prefix of the new one.
    """
    old = previous.get("params", {})
    grid = params["config"]["nprobe_grid"]
    if old.get("size") != params["size"] or "config" not in old:
        return False
    if {**old["config"], "nprobe_grid": grid} != params["config"]:
        return False
    tuning = previous["index"]["compressed"]
    walked = [step["nprobe"] for step in tuning["tuning"]]
    return old["config"]["nprobe_grid"] == grid or (
        walked == grid[: len(walked)] and tuning["tuning"][-1]["recall"] >= tuning["target_recall"]
    )


def synthesize(size: CatalogueSize, out: Path, seed: int, fresh: bool) -> Path:
    """Write the size's synthetic dataset, unless `out` already holds exactly that one."""
    from slimrec.models.synth import write_synthetic

    stamp = out / "params.json"
    wanted = {**asdict(size), "seed": seed}
    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return out
    log(
        f"{size.label}: generating {size.n_items:,} items, {size.n_users:,} users, "
        f"{size.n_interactions:,} interactions"
    )
    write_synthetic(out, size.n_items, size.n_users, size.n_interactions, seed=seed)
    stamp.write_text(json.dumps(wanted) + "\n")
    return out


# --- the whole run ------------------------------------------------------------------------------


def run_scale(
    sizes: list[CatalogueSize], out: Path, config: ScaleConfig, timing, fresh: bool = False
) -> dict:
    """Build and bench every size in turn; writes <out>/scale.{json,md,png} after each size."""
    from slimrec.bench.scale_render import plot_scale, render_scale

    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in sizes:
        started = time.perf_counter()
        work = out / size.label
        build = build_size(size, work, config, fresh)
        gc.collect()
        log(f"{size.label}: benchmarking {work / 'full'} vs {work / 'compressed'}")
        bench = bench_artifacts({"full": work / "full", "compressed": work / "compressed"}, timing)
        write_report(bench, work)
        runs.append(
            {
                "size": asdict(size),
                "build": build,
                "bench": bench,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        report = {
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "config": config.to_dict(),
            "timing": timing.to_dict(),
            "sizes": runs,
        }
        (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "scale.md").write_text(render_scale(report) + "\n")
        (out / "scale.png").write_bytes(plot_scale(report))
    print(render_scale(report))
    log(f"wrote {out / 'scale.json'}, {out / 'scale.md'} and {out / 'scale.png'}")
    return report
