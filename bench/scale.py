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
the step). No PROTOCOL evaluation at scale (the quality figures come from ml-100k): only
the index's recall@200 and a two-stage recall@10 on a sample of users as a sanity check.
Nothing here builds an [n_users, n_items] matrix: exact search runs in FAISS on sampled
users, and training's exact top-k scores users in blocks sized to the catalogue.
An earlier run's data and artifacts are reused when their parameters match (`--fresh` rebuilds).
"""

from __future__ import annotations

import gc
import json
import resource
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
from slimrec.bench.stages import bench_artifacts, parse_count, write_report

K = 200  # recall@K of the compressed index against exact search
# (items, users, interactions) of the sizes the scale run is tuned for; others interpolate log-log.
SHAPES = ((2_000, 1_000, 20_000), (10_000, 20_000, 500_000), (100_000, 50_000, 2_000_000),
          (1_000_000, 200_000, 10_000_000))
MIN_PER_USER = 5  # models.synth.MIN_PER_USER, checked before anything long starts


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


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
            raise ValueError(f"--catalogue entry {part!r}: expected ITEMS (e.g. 100k) "
                             "or ITEMS:USERS:INTERACTIONS (e.g. 2k:1k:20k)")
        cap = max(MIN_PER_USER, n_items // 2)
        if not MIN_PER_USER * n_users <= n_interactions <= cap * n_users:
            raise ValueError(f"--catalogue entry {part!r}: {n_interactions:,} interactions for "
                             f"{n_users:,} users must lie in [{MIN_PER_USER * n_users:,}, {cap * n_users:,}]")
        sizes.append(CatalogueSize(part.lower().replace(":", "-"), n_items, n_users, n_interactions))
    if not sizes:
        raise ValueError("--catalogue: no sizes given (e.g. --catalogue 10k,100k,1m)")
    labels = [s.label for s in sizes]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--catalogue: duplicate sizes in {text!r}")
    return sizes


# --- configuration ------------------------------------------------------------------------------


@dataclass
class ScaleConfig:
    """How the models of each size are trained and the compressed index tuned.

    Args:
        preset: "default" (the teacher of `slimrec train`, the student of `slimrec compress`)
            or "tiny" (the test presets).
        train_interactions: fitted interactions one retrieval epoch samples; None = all.
        ranker_users, cut_points: one ranker epoch's lists (RankerData.max_users, cut_points).
            Every stage keeps its preset's batch size and learning rate, for one epoch.
        retrieval_weight: the blend weight of the retrieval score (not chosen on validation here).
        embedding_min_count: the compressed variant's pruning at scale: users and items with fewer
            fitted interactions share the fallback id row (`share_rare_rows_`) and embed from
            their side features and history. A Zipf catalogue's tail is most of its id table
            and barely trained; 0 keeps every row. (The hidden-unit pruning of `slimrec
            compress` needs a fine-tuning pass that the one-epoch scale training skips.)
        index_kind: the compressed variant's IVF code ("ivf_sq8", "ivf_sq6" or "ivf_sq4"). SQ6 by
            default: on the 1M catalogue its recall@200 at nprobe 16 was that of SQ8 (0.9976 vs
            0.9977) in three quarters of the bytes, and the index is the compressed variant's
            largest resident part there; SQ4 lost 0.0035 more.
        target_recall, nprobe_grid: the IVF tuning (smallest nprobe reaching the target).
        recall_tolerance: a found item within this of the exact K-th best score counts as a hit
            (`slimrec.artifact.index.recall_within`); the strict set intersection is reported beside it.
        tune_users, recall_users: disjoint samples of test users: tuning, then the reported recall.
        train_threads: torch and FAISS threads while building (0 = all CPUs). 1 by default: on a
            shared 2-vCPU host, two OpenMP threads that spin at every barrier while the other is
            descheduled trained the tiny models 12x slower than one.
    """

    preset: str = "default"
    train_interactions: int | None = 250_000
    ranker_users: int = 2_000
    cut_points: int = 2
    retrieval_weight: float = 0.4
    embedding_min_count: int = 10
    index_kind: str = "ivf_sq6"
    target_recall: float = 0.97
    recall_tolerance: float = 1e-3
    nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
    tune_users: int = 500
    recall_users: int = 1000
    train_threads: int = 1
    seed: int = 0

    def __post_init__(self):
        from slimrec.artifact.index import SQ_KINDS

        self.nprobe_grid = tuple(self.nprobe_grid)
        if self.preset not in ("default", "tiny"):
            raise ValueError(f"unknown preset {self.preset!r}; expected 'default' or 'tiny'")
        if self.embedding_min_count < 0:
            raise ValueError(f"embedding_min_count must be >= 0, got {self.embedding_min_count}")
        if self.index_kind not in SQ_KINDS:
            raise ValueError(f"unknown index_kind {self.index_kind!r}; "
                             f"expected one of {tuple(SQ_KINDS)}")
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall must be in (0, 1], got {self.target_recall}")

    @classmethod
    def for_preset(cls, preset: str, **overrides) -> ScaleConfig:
        """The preset's settings; overrides that are None keep them."""
        base = {} if preset == "default" else {
            "train_interactions": None, "ranker_users": 300, "cut_points": 1, "tune_users": 100,
            "recall_users": 200, "nprobe_grid": (1, 4, 16, 64)}
        return cls(preset=preset, **{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def to_dict(self) -> dict:
        return asdict(self)

    def train_config(self):
        from slimrec.models.presets import train_config

        config = train_config("teacher" if self.preset == "default" else "tiny", seed=self.seed)
        config.retrieval_schedule = replace(config.retrieval_schedule, max_epochs=1)
        config.ranker_schedule = replace(config.ranker_schedule, max_epochs=1)
        config.ranker_data = replace(config.ranker_data, cut_points=self.cut_points,
                                     max_users=self.ranker_users)
        return config

    def distill_config(self):
        from slimrec.compression.presets import compress_config

        distill = compress_config("default" if self.preset == "default" else "tiny").distill
        # One epoch over a sample leaves most id rows as initialised, N(0, 1): random directions
        # that no trained model has and that an IVF cannot cluster. The teacher preset's
        # decoupled weight decay pulls the rows a short run never visits towards 0, so those
        # items embed from their side features; the student gets the same decay here.
        decay = self.train_config().retrieval_schedule.weight_decay
        return replace(distill, teacher_candidates=0,
                       retrieval_schedule=replace(distill.retrieval_schedule, max_epochs=1,
                                                  weight_decay=decay),
                       ranker_schedule=replace(distill.ranker_schedule, max_epochs=1))


# --- one size -----------------------------------------------------------------------------------


class Clock:
    """Named wall-clock seconds of consecutive steps."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t, 3)
        self._t = now
        return self.seconds[name]


def build_size(size: CatalogueSize, work: Path, config: ScaleConfig, fresh: bool = False) -> dict:
    """Data, teacher, student, indexes and both artifacts for one size; returns build.json's content."""
    # Round-tripped through JSON (tuples become lists) so it compares equal to a build.json's.
    params = json.loads(json.dumps({"size": asdict(size), "config": config.to_dict()}))
    record = work / "build.json"
    built = all((work / v / "manifest.json").is_file() for v in ("full", "compressed"))
    if not fresh and built and record.is_file():
        previous = json.loads(record.read_text())
        if same_build(previous, params):
            log(f"{size.label}: reusing the data and artifacts in {work} (--fresh rebuilds)")
            return previous
    import faiss
    import torch
    from slimrec.artifact.index import IndexSpec
    from slimrec.bench.scale_models import (
        build_indexes,
        served_checks,
        stage_summary,
        train_models,
        training_view,
        write_served,
    )
    from slimrec.bench.timing import all_cpus
    from slimrec.compression.pipeline import PipelineConfig
    from slimrec.compression.prune_embeddings import embedding_rows
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
    log(f"{size.label}: {dataset.n_items:,} items, {dataset.n_users:,} users, "
        f"{len(fold.fit_positions):,} fitted interactions; one retrieval epoch = "
        f"{len(sample.fit_positions):,} of them")

    teacher, student = train_models(fold, sample, train_config, config, clock)
    users = rng.permutation(fold.eval_users)  # disjoint samples: tune nprobe on some, report recall on others
    tune_users = users[: config.tune_users]
    recall_users = users[config.tune_users : config.tune_users + config.recall_users]
    spec, index_info = build_indexes(teacher, student, fold, tune_users, config, clock)

    data = {"dataset": dataset.name, "source": str(data_dir), "fingerprint": dataset.fingerprint(),
            "split_fingerprint": split.fingerprint()}
    meta = {"train": train_config.to_dict(), "scale": params}
    write_served(work / "full", "full", teacher, IndexSpec("flat"), None, data, meta)
    clock.lap("write_full")
    pipeline = PipelineConfig()
    steps = {"distill": config.distill_config().to_dict(), "embeddings": pipeline.embeddings.to_dict(),
             "dense": pipeline.dense.to_dict()}
    write_served(work / "compressed", "compressed", student, spec, pipeline.dense, data,
                 {**meta, "pipeline": steps})
    clock.lap("write_compressed")
    checks = served_checks(work, dataset, split, recall_users, threads, config.recall_tolerance)
    clock.lap("recall_sanity")
    result = {
        "params": params,
        "shape": {"n_items": dataset.n_items, "n_users": dataset.n_users,
                  "interactions": len(dataset.interactions),
                  "fitted_interactions": int(len(fold.fit_positions)),
                  "items_with_fitted_interactions": int((fold.item_popularity > 0).sum()),
                  "retrieval_epoch_interactions": int(len(sample.fit_positions)),
                  "items_in_retrieval_epoch": int(len(np.unique(fold.split.item[sample.fit_positions]))),
                  "compressed_id_rows": {**embedding_rows(student.two_tower), **{
                      f"ranker.{k}": v for k, v in embedding_rows(student.ranker).items()}}},
        "training": {name: stage_summary(stage) for name, stage in (
            ("teacher_retrieval", teacher.retrieval), ("teacher_ranker", teacher.ranking),
            ("student_retrieval", student.retrieval), ("student_ranker", student.ranking))},
        "index": index_info,
        **checks,
        "seconds": clock.seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


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
    return (old["config"]["nprobe_grid"] == grid
            or (walked == grid[: len(walked)] and tuning["tuning"][-1]["recall"] >= tuning["target_recall"]))


def synthesize(size: CatalogueSize, out: Path, seed: int, fresh: bool) -> Path:
    """Write the size's synthetic dataset, unless `out` already holds exactly that one."""
    from slimrec.models.synth import write_synthetic

    stamp = out / "params.json"
    wanted = {**asdict(size), "seed": seed}
    if not fresh and stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return out
    log(f"{size.label}: generating {size.n_items:,} items, {size.n_users:,} users, "
        f"{size.n_interactions:,} interactions")
    write_synthetic(out, size.n_items, size.n_users, size.n_interactions, seed=seed)
    stamp.write_text(json.dumps(wanted) + "\n")
    return out


# --- the whole run ------------------------------------------------------------------------------


def run_scale(sizes: list[CatalogueSize], out: Path, config: ScaleConfig, timing,
              fresh: bool = False) -> dict:
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
        runs.append({"size": asdict(size), "build": build, "bench": bench,
                     "seconds": round(time.perf_counter() - started, 1)})
        report = {"created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "config": config.to_dict(),
                  "timing": timing.to_dict(), "sizes": runs}
        (out / "scale.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "scale.md").write_text(render_scale(report) + "\n")
        (out / "scale.png").write_bytes(plot_scale(report))
    print(render_scale(report))
    log(f"wrote {out / 'scale.json'}, {out / 'scale.md'} and {out / 'scale.png'}")
    return report
