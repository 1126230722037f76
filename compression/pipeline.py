"""`slimrec compress`: teacher -> distil -> prune + fine-tune -> int8 -> compressed index.

The stages run twice, as training does (PROTOCOL.md): on the teacher fitted on
train ("selection/", early stopping, the ranking blend and the index's nprobe are
chosen on validation, and the quality gate reads validation), then on the teacher
fitted on train + valid with those choices fixed (the served model, scored on test).

Every stage is written as a complete artifact under `<out>.stages/<stage>/`, so
each is evaluated and timed through the same served path; the last stage is the
compressed artifact itself, with `report.md`, `report.json` and `report.png`.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from slimrec.artifact import load_artifact, update_metrics
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.index import IndexSpec
from slimrec.compression.distill import DistillConfig, distill_ranker, distill_two_tower
from slimrec.compression.prune import PruneConfig, prune_
from slimrec.compression.quantize_embeddings import EmbeddingQuantConfig, quantize_embeddings_
from slimrec.compression.quantize_onnx import OnnxQuantConfig
from slimrec.models.data import Dataset
from slimrec.models.fold import FIT_TRAIN, FIT_TRAIN_VALID, Fold
from slimrec.models.package import SELECTION_PREFIX, SERVED_PREFIX, read_teacher, write_fitted_artifact
from slimrec.models.served_eval import evaluate_artifact
from slimrec.models.split import protocol_split
from slimrec.models.train import FoldModels, StageResult, StageSchedule, TrainConfig, log

STAGES = ("teacher", "student", "pruned", "int8", "compressed")


@dataclass
class GateConfig:
    tolerance: float = 0.02  # relative: compressed >= teacher * (1 - tolerance)
    metrics: tuple[str, ...] = ("ndcg@10", "recall@200")

    def __post_init__(self):
        self.metrics = tuple(self.metrics)
        if not 0 <= self.tolerance < 1:
            raise ValueError(f"gate.tolerance must be in [0, 1), got {self.tolerance}")


@dataclass
class IndexTuning:
    kind: str = "ivf_sq8"
    target_recall: float = 0.99  # recall@200 of the compressed index against exact search
    nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

    def __post_init__(self):
        self.nprobe_grid = tuple(self.nprobe_grid)
        IndexSpec(self.kind)  # validates the kind
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"index.target_recall must be in (0, 1], got {self.target_recall}")


@dataclass
class PipelineConfig:
    version: int = 1
    seed: int = 0
    distill: DistillConfig = field(default_factory=DistillConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    finetune: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=6, batch_size=1024, lr=1e-3, patience=2))
    finetune_ranker: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=3, batch_size=64, lr=5e-4, patience=1))
    embeddings: EmbeddingQuantConfig = field(default_factory=EmbeddingQuantConfig)
    dense: OnnxQuantConfig = field(default_factory=OnnxQuantConfig)
    index: IndexTuning = field(default_factory=IndexTuning)
    gate: GateConfig = field(default_factory=GateConfig)

    SECTIONS = {"distill": DistillConfig, "prune": PruneConfig, "finetune": StageSchedule,
                "finetune_ranker": StageSchedule, "embeddings": EmbeddingQuantConfig,
                "dense": OnnxQuantConfig, "index": IndexTuning, "gate": GateConfig}

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"PipelineConfig.version {self.version} is not supported (expected 1)")

    def to_dict(self) -> dict:
        out = {"type": "PipelineConfig", "version": self.version, "seed": self.seed}
        for name, cls in self.SECTIONS.items():
            section = getattr(self, name)
            values = section.to_dict() if hasattr(section, "to_dict") else asdict(section)
            out[name] = {"type": cls.__name__, **{k: v for k, v in values.items() if not callable(v)}}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> PipelineConfig:
        """Inverse of to_dict; unknown sections, keys or type tags are errors, not ignored."""
        d = dict(d)
        if d.pop("type", "PipelineConfig") != "PipelineConfig":
            raise ValueError("compress config: top-level type must be PipelineConfig")
        unknown = set(d) - set(cls.SECTIONS) - {"version", "seed"}
        if unknown:
            raise ValueError(f"compress config: unknown section(s) {sorted(unknown)}; "
                             f"expected {sorted(cls.SECTIONS)}")
        kwargs = {k: d[k] for k in ("version", "seed") if k in d}
        for name, section_cls in cls.SECTIONS.items():
            if name not in d:
                continue
            values = dict(d[name])
            values.pop("calibration_feeds", None)  # a count written by OnnxQuantConfig.to_dict, not an input
            tag = values.pop("type", section_cls.__name__)
            if tag != section_cls.__name__:
                raise ValueError(f"compress config: [{name}] has type {tag!r}, expected {section_cls.__name__!r}")
            try:
                kwargs[name] = section_cls(**values)
            except TypeError as exc:
                raise ValueError(f"compress config: [{name}]: {exc}") from None
        return cls(**kwargs)


@dataclass
class StageModels:
    """One stage's models for both folds."""

    selected: FoldModels
    final: FoldModels


def _fold_models(fold: Fold, two_tower, ranker, weight: float, retrieval: StageResult,
                 ranking: StageResult) -> FoldModels:
    return FoldModels(fold, two_tower, ranker, weight, retrieval, ranking)


def _copy_result(result: StageResult, model) -> StageResult:
    return StageResult(model, result.epochs, result.history, result.seconds)


# --- the stages on one fold -------------------------------------------------------------------


def run_stages(fold: Fold, teacher: tuple, train_config: TrainConfig, config: PipelineConfig,
               fixed: dict | None) -> dict[str, FoldModels]:
    """Distil, prune + fine-tune, quantize on one fold. `fixed` carries epochs and blend weights
    chosen on the selection fold; None means choose them here (early stopping on validation)."""
    _, t_two_tower, t_ranker = teacher
    fixed = fixed or {}
    weights = (fixed["weight"],) if "weight" in fixed else train_config.retrieval_weights
    out = {}

    retrieval = distill_two_tower(t_two_tower, fold, train_config, config.distill, fixed.get("student_retrieval"))
    ranking = distill_ranker(t_ranker, retrieval.model, fold, train_config, config.distill,
                             fixed.get("student_ranker"), weights)
    weight = fixed.get("weight", ranking.history[-1]["retrieval_weight"])
    out["student"] = _fold_models(fold, retrieval.model, ranking.model, weight, retrieval, ranking)

    two_tower, ranker = copy.deepcopy(retrieval.model), copy.deepcopy(ranking.model)
    counts = _fit_counts(fold)
    for model in (two_tower, ranker):
        prune_(model, config.prune, user_counts=counts[0], item_counts=counts[1])
    tuned_retrieval = distill_two_tower(t_two_tower, fold, train_config, config.distill,
                                        fixed.get("pruned_retrieval"), student=two_tower,
                                        schedule=config.finetune, name="fine-tune retrieval")
    tuned_ranking = distill_ranker(t_ranker, tuned_retrieval.model, fold, train_config, config.distill,
                                   fixed.get("pruned_ranker"), (weight,), student=ranker,
                                   schedule=config.finetune_ranker, name="fine-tune ranker")
    out["pruned"] = _fold_models(fold, tuned_retrieval.model, tuned_ranking.model, weight,
                                 tuned_retrieval, tuned_ranking)

    q_two_tower = quantize_embeddings_(copy.deepcopy(tuned_retrieval.model), config.embeddings)
    q_ranker = quantize_embeddings_(copy.deepcopy(tuned_ranking.model), config.embeddings)
    out["int8"] = _fold_models(fold, q_two_tower, q_ranker, weight,
                               _copy_result(tuned_retrieval, q_two_tower), _copy_result(tuned_ranking, q_ranker))
    return out


def _fit_counts(fold: Fold) -> tuple[np.ndarray, np.ndarray]:
    users = np.bincount(fold.split.user[fold.fit_positions], minlength=fold.dataset.n_users)
    return users, fold.item_popularity


def chosen(models: dict[str, FoldModels]) -> dict:
    """What the selection fold decided, to be replayed on the final fold."""
    return {
        "weight": models["student"].retrieval_weight,
        "student_retrieval": models["student"].retrieval.epochs,
        "student_ranker": models["student"].ranking.epochs,
        "pruned_retrieval": models["pruned"].retrieval.epochs,
        "pruned_ranker": models["pruned"].ranking.epochs,
    }


# --- the whole pipeline -------------------------------------------------------------------------


def compress(teacher_path: Path, out: Path, dataset: Dataset, config: PipelineConfig) -> dict:
    """Run every stage on both folds, write one artifact per stage, evaluate, gate, report."""
    from slimrec.compression.report import measure_latency, stage_sizes, write_report
    from slimrec.compression.tune_index import tune_index

    torch.manual_seed(config.seed)
    teacher_artifact = load_artifact(teacher_path)
    train_config = TrainConfig.from_dict(teacher_artifact.config["train"])
    train_config.seed = config.seed
    space = FeatureSpace.from_dict(teacher_artifact.config["feature_space"])
    split = protocol_split(dataset)
    folds = {p: Fold.create(name, dataset, split, space)
             for p, name in ((SELECTION_PREFIX, FIT_TRAIN), (SERVED_PREFIX, FIT_TRAIN_VALID))}
    teachers = {p: read_teacher(teacher_artifact, p, folds[p]) for p in folds}

    log("== compress: stages on the selection fold (fit on train, choose on valid)")
    selected = run_stages(folds[SELECTION_PREFIX], teachers[SELECTION_PREFIX], train_config, config, None)
    log("== compress: stages on the final fold (fit on train + valid, choices fixed)")
    final = run_stages(folds[SERVED_PREFIX], teachers[SERVED_PREFIX], train_config, config, chosen(selected))

    stages_dir = out.with_name(out.name + ".stages")
    data = dict(teacher_artifact.manifest["data"])
    base_config = {"train": train_config.to_dict(), "pipeline": config.to_dict(),
                   "teacher": {"path": str(teacher_path), "created_at": teacher_artifact.manifest["created_at"]}}
    index_spec = tune_index(selected["int8"], config.index)
    plan = [("student", IndexSpec("flat"), None), ("pruned", IndexSpec("flat"), None),
            ("int8", IndexSpec("flat"), config.dense), ("compressed", index_spec, config.dense)]
    paths = {"teacher": teacher_path}
    for stage, spec, dense in plan:
        source = "int8" if stage == "compressed" else stage
        path = out if stage == "compressed" else stages_dir / stage
        log(f"== compress: writing and evaluating stage {stage} -> {path}")
        write_fitted_artifact(path, "compressed" if stage == "compressed" else stage, selected[source],
                              final[source], {**base_config, "stage": stage}, data, spec, dense_quant=dense)
        update_metrics(path, evaluate_artifact(load_artifact(path), dataset))
        paths[stage] = path

    artifacts = {stage: load_artifact(p) for stage, p in paths.items()}
    latency = measure_latency(artifacts, dataset)
    report = write_report(out, artifacts, stage_sizes(artifacts), latency, config.gate)
    return report


def gate(teacher_metrics: dict, candidate_metrics: dict, config: GateConfig) -> list[str]:
    """Failures of the quality gate on validation two-stage metrics; empty when promotable."""
    failures = []
    for name in config.metrics:
        t = teacher_metrics["two_stage"]["valid"][name]
        c = candidate_metrics["two_stage"]["valid"][name]
        if c < t * (1 - config.tolerance):
            failures.append(f"two-stage {name} on validation {c:.4f} < teacher {t:.4f} x "
                            f"(1 - {config.tolerance:g}) = {t * (1 - config.tolerance):.4f}")
    return failures

