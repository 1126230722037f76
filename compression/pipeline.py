"""`slimrec compress`: teacher -> distil -> prune + fine-tune -> int8 -> compressed index.

The stages run twice, as training does (PROTOCOL.md): on the teacher fitted on
train ("selection/", early stopping, the ranking blend, the index's nprobe and the
ranker's candidate budget are chosen on validation, and the quality gate reads
validation), then on the teacher fitted on train + valid with those choices fixed
(the served model, scored on test).

Every stage is written as a complete artifact under `<out>.stages/<stage>/`, so
each is evaluated and timed through the same served path; the last stage is the
compressed artifact itself, with `report.md`, `report.json` and `report.png`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import cast

import torch
from slimrec.artifact import load_artifact, update_metrics
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.index import IndexSpec
from slimrec.compression.distill import (
    DistillConfig,
    TeacherCache,
    distill_ranker,
    distill_two_tower,
    ranker_from_teacher,
    teacher_ranker_stage,
)
from slimrec.compression.pipeline_config import PipelineConfig
from slimrec.compression.prune import PruneConfig, prune_
from slimrec.compression.quantize_embeddings import EmbeddingQuantConfig, quantize_embeddings_
from slimrec.compression.report import measure_latency, stage_sizes, write_report
from slimrec.compression.tune_candidates import tune_candidate_budget
from slimrec.compression.tune_index import tune_index
from slimrec.models.checkpoint import Checkpoints, StageCheckpoint
from slimrec.models.data import Dataset
from slimrec.models.device import describe as describe_device
from slimrec.models.device import training_device
from slimrec.models.export import ExportCache
from slimrec.models.fold import FIT_TRAIN, FIT_TRAIN_VALID, Fold
from slimrec.models.package import SELECTION_PREFIX, SERVED_PREFIX, read_teacher, write_fitted_artifact
from slimrec.models.ranker import Ranker
from slimrec.models.served_eval import evaluate_artifact
from slimrec.models.split import protocol_split
from slimrec.models.stage_times import StageTimes
from slimrec.models.train import FoldModels, TrainConfig, log
from slimrec.models.two_tower import TwoTower

# --- the stages, each callable alone (the scale benchmark runs some of them) ---------------------

Teacher = tuple[TwoTower, Ranker]
Epochs = tuple[int | None, int | None]  # (retrieval, ranker); None: early stopping on validation
CheckpointFor = Callable[[str], StageCheckpoint | None]  # a stage's name -> its checkpoint, if any


def no_checkpoint(name: str) -> StageCheckpoint | None:
    return None


def distill_stage(
    teacher: Teacher,
    fold: Fold,
    train_config: TrainConfig,
    config: DistillConfig,
    epochs: Epochs = (None, None),
    weights: tuple[float, ...] = (0.0,),
    retrieval_fold: Fold | None = None,
    lap: Callable[[str], object] | None = None,
    checkpoint: CheckpointFor = no_checkpoint,
    cache: TeacherCache | None = None,
) -> FoldModels:
    """A student two-tower and ranker distilled from `teacher` on `fold`.

    Args:
        weights: retrieval weights of the ranking blend, one chosen on validation (one given: that one).
        retrieval_fold: the rows the student two-tower fits (default `fold`; the scale bench samples them).
        lap: called with "student_retrieval", then "student_ranker", as each model is trained.
        checkpoint: each model's per-epoch checkpoint, by stage name (resume; see run_epochs).
        cache: the teacher's retrieval outputs per example of `fold`, to share with fine-tuning.
    """
    teacher_two_tower, teacher_ranker = teacher
    retrieval = distill_two_tower(
        teacher_two_tower,
        retrieval_fold or fold,
        train_config,
        config,
        epochs[0],
        checkpoint=checkpoint("student-retrieval"),
        cache=cache,
    )
    if lap:
        lap("student_retrieval")
    two_tower = cast(TwoTower, retrieval.model)  # a StageResult holds its model as an nn.Module
    if ranker_from_teacher(teacher_ranker, config):  # nothing to distil: start from the teacher's
        ranking = teacher_ranker_stage(teacher_ranker, two_tower, fold, train_config, weights)
    else:
        ranking = distill_ranker(
            teacher_ranker,
            two_tower,
            fold,
            train_config,
            config,
            epochs[1],
            weights,
            checkpoint=checkpoint("student-ranker"),
        )
    if lap:
        lap("student_ranker")
    weight = ranking.history[-1]["retrieval_weight"]
    return FoldModels(fold, two_tower, cast(Ranker, ranking.model), weight, retrieval, ranking)


def prune_stage_(models: FoldModels, config: PruneConfig) -> FoldModels:
    """Prune both models in place (`prune_`); rare ids are counted on the fold's fitted rows."""
    fold = models.fold
    for model in (models.two_tower, models.ranker):
        prune_(model, config, user_counts=fold.fit_counts, item_counts=fold.item_popularity)
    return models


def finetune_stage(
    teacher: Teacher,
    pruned: FoldModels,
    train_config: TrainConfig,
    config: PipelineConfig,
    epochs: Epochs = (None, None),
    checkpoint: CheckpointFor = no_checkpoint,
    cache: TeacherCache | None = None,
) -> FoldModels:
    """Fine-tune pruned models against the teacher (the distillation losses, the short schedules)."""
    teacher_two_tower, teacher_ranker = teacher
    fold, weight = pruned.fold, pruned.retrieval_weight
    retrieval = distill_two_tower(
        teacher_two_tower,
        fold,
        train_config,
        config.distill,
        epochs[0],
        student=pruned.two_tower,
        schedule=config.finetune,
        name="fine-tune retrieval",
        checkpoint=checkpoint("finetune-retrieval"),
        cache=cache,
    )
    two_tower = cast(TwoTower, retrieval.model)
    ranking = distill_ranker(
        teacher_ranker,
        two_tower,
        fold,
        train_config,
        config.distill,
        epochs[1],
        (weight,),
        student=pruned.ranker,
        schedule=config.finetune_ranker,
        name="fine-tune ranker",
        checkpoint=checkpoint("finetune-ranker"),
    )
    return FoldModels(fold, two_tower, cast(Ranker, ranking.model), weight, retrieval, ranking)


def quantize_stage_(models: FoldModels, config: EmbeddingQuantConfig) -> FoldModels:
    """Quantize both models' embedding tables in place (`quantize_embeddings_`)."""
    for model in (models.two_tower, models.ranker):
        quantize_embeddings_(model, config)
    return models


def copy_models(models: FoldModels) -> FoldModels:
    """Deep copies of both models (the fold is shared), for a stage that changes them in place."""
    two_tower, ranker = copy.deepcopy(models.two_tower), copy.deepcopy(models.ranker)
    return FoldModels(
        models.fold,
        two_tower,
        ranker,
        models.retrieval_weight,
        replace(models.retrieval, model=two_tower),
        replace(models.ranking, model=ranker),
    )


# --- the stages on one fold -------------------------------------------------------------------


def run_stages(
    fold: Fold,
    teacher: Teacher,
    train_config: TrainConfig,
    config: PipelineConfig,
    fixed: dict | None,
    times: StageTimes | None = None,
    checkpoints: Checkpoints | None = None,
) -> dict[str, FoldModels]:
    """Distil, prune + fine-tune, quantize on one fold. `fixed` carries epochs and blend weights
    chosen on the selection fold; None means choose them here (early stopping on validation).
    `times` gets each stage's seconds; `checkpoints`, each training stage's per-epoch state."""
    fixed = fixed or {}
    times = times or StageTimes()
    # Students are built before their stage seeds itself: seeding the fold makes the final fold's
    # models independent of how many epochs the selection fold happened to run.
    torch.manual_seed(config.seed)
    weights = (fixed["weight"],) if "weight" in fixed else train_config.retrieval_weights

    def checkpoint(stage: str) -> StageCheckpoint | None:
        return checkpoints.stage(f"{fold.name}-{stage}") if checkpoints else None

    cache = TeacherCache(config.distill.teacher_candidates)  # the teacher's outputs on this fold
    student = distill_stage(
        teacher,
        fold,
        train_config,
        config.distill,
        (fixed.get("student_retrieval"), fixed.get("student_ranker")),
        weights,
        checkpoint=checkpoint,
        cache=cache,
    )
    with times.stage(f"{fold.name}/prune"):
        pruned = prune_stage_(copy_models(student), config.prune)
    tuned = finetune_stage(
        teacher,
        pruned,
        train_config,
        config,
        (fixed.get("pruned_retrieval"), fixed.get("pruned_ranker")),
        checkpoint=checkpoint,
        cache=cache,
    )
    with times.stage(f"{fold.name}/quantize"):
        int8 = quantize_stage_(copy_models(tuned), config.embeddings)
    for name, models in (("student", student), ("fine-tune", tuned)):
        times.merge(f"{fold.name} {name} retrieval", models.retrieval.times)
        times.merge(f"{fold.name} {name} ranker", models.ranking.times)
    return {"student": student, "pruned": tuned, "int8": int8}


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


def compress(
    teacher_path: Path, out: Path, dataset: Dataset, config: PipelineConfig, resume: bool = False
) -> dict:
    """Run every stage on both folds, write one artifact per stage, evaluate, gate, report.

    Training stages checkpoint each epoch in `<out>.checkpoints/`; `resume` continues from there.
    """
    torch.manual_seed(config.seed)
    times = StageTimes()
    with times.stage("load_data"):
        teacher_artifact = load_artifact(teacher_path)
        train_config = TrainConfig.from_dict(teacher_artifact.config["train"])
        train_config.seed = config.seed
        space = FeatureSpace.from_dict(teacher_artifact.config["feature_space"])
        split = protocol_split(dataset)
        folds = {
            p: Fold.create(name, dataset, split, space)
            for p, name in ((SELECTION_PREFIX, FIT_TRAIN), (SERVED_PREFIX, FIT_TRAIN_VALID))
        }
        teachers = {p: read_teacher(teacher_artifact, p, folds[p])[1:] for p in folds}
    checkpoints = Checkpoints(
        out.with_name(out.name + ".checkpoints"),
        {
            "pipeline": config.to_dict(),
            "teacher": teacher_artifact.manifest["files"],
            "data": dataset.fingerprint(),
        },
        resume,
    )

    log("== compress: stages on the selection fold (fit on train, choose on valid)")
    selected = run_stages(
        folds[SELECTION_PREFIX], teachers[SELECTION_PREFIX], train_config, config, None, times, checkpoints
    )
    log("== compress: stages on the final fold (fit on train + valid, choices fixed)")
    final = run_stages(
        folds[SERVED_PREFIX],
        teachers[SERVED_PREFIX],
        train_config,
        config,
        chosen(selected),
        times,
        checkpoints,
    )

    stages_dir = out.with_name(out.name + ".stages")
    data = dict(teacher_artifact.manifest["data"])
    base_config = {
        "train": train_config.to_dict(),
        "pipeline": config.to_dict(),
        "teacher": {"path": str(teacher_path), "created_at": teacher_artifact.manifest["created_at"]},
        "device": describe_device(training_device()),
    }
    with times.stage("index/tune"):
        index_spec = tune_index(selected["int8"], config.index).spec
    plan = [
        ("student", IndexSpec("flat"), None),
        ("pruned", IndexSpec("flat"), None),
        ("int8", IndexSpec("flat"), config.dense),
        ("compressed", index_spec, config.dense),
    ]
    paths = {"teacher": teacher_path}
    graphs = ExportCache()  # each architecture traced once; the other stages and folds swap weights in
    for stage, spec, dense in plan:
        source = "int8" if stage == "compressed" else stage
        path = out if stage == "compressed" else stages_dir / stage
        log(f"== compress: writing and evaluating stage {stage} -> {path}")
        with times.stage(f"{stage}/export"):
            write_fitted_artifact(
                path,
                "compressed" if stage == "compressed" else stage,
                selected[source],
                final[source],
                {**base_config, "stage": stage},
                data,
                spec,
                dense_quant=dense,
                graphs=graphs,
            )
        if stage == "compressed":  # the ranker's candidate budget, chosen on validation
            with times.stage("compressed/candidates"):
                tune_candidate_budget(path, dataset, config.gate, torch.get_num_threads())
        with times.stage(f"{stage}/evaluate"):
            # ONNX Runtime on as many threads as torch: all cores would spin against the other work
            update_metrics(path, evaluate_artifact(load_artifact(path), dataset, torch.get_num_threads()))
        paths[stage] = path
    log(f"== compress: {graphs.reused} ONNX graphs reused from an export of the same architecture")
    checkpoints.remove()

    with times.stage("report/latency"):
        artifacts = {stage: load_artifact(p) for stage, p in paths.items()}
        latency = measure_latency(artifacts, dataset)
    log("time and peak RSS by stage (the report's own writing not included):\n" + times.summary())
    timing = {"stages": times.to_dict(), "by_part": times.by_part()}
    return write_report(out, artifacts, stage_sizes(artifacts), latency, config.gate, timing, dataset)
