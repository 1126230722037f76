"""Training: the retrieval two-tower, then the DCN-v2 ranker on its candidate lists.

Reads top to bottom: `fit_teacher` runs both stages on one `Fold`. With
`epochs=None` a stage early-stops on the fold's scored split (validation) and
keeps its best state; with a number it trains exactly that long (the refit on
train + validation, which must not look at test). The epoch loop and its
checkpoints are `slimrec.models.epochs`; the ranker's lists `slimrec.models.ranker_data`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from slimrec.models.checkpoint import Checkpoints, StageCheckpoint
from slimrec.models.csr import csr_from_pairs
from slimrec.models.distributed import global_mean, local_slice
from slimrec.models.epochs import StageResult, StageSchedule, log, run_epochs, seed_everything
from slimrec.models.evaluate import evaluate_ranked, evaluate_retrieval, item_embeddings, retrieve_candidates
from slimrec.models.fold import Fold
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.ranker_data import FittedPairs, RankerData, ranker_lists
from slimrec.models.sequence_tower import window_rows
from slimrec.models.two_tower import TwoTower, TwoTowerConfig

__all__ = ["StageResult", "StageSchedule", "RankerData", "log"]  # re-exported: the training API in one place


PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class TrainConfig:
    seed: int = 0
    history_len: int = 50
    two_tower: TwoTowerConfig = field(default_factory=TwoTowerConfig)
    ranker: RankerConfig = field(default_factory=RankerConfig)
    retrieval_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=40, batch_size=1024, lr=2e-3, patience=4)
    )
    ranker_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=8, batch_size=64, lr=1e-3, patience=2)
    )
    ranker_data: RankerData = field(default_factory=RankerData)
    retrieval_weights: tuple[float, ...] = (0.0, 0.4, 0.8, 1.6, 3.2, 6.4)
    # "bf16": forward passes in training steps under bfloat16 autocast (about 2x faster matmuls on
    # CPUs with AVX512-BF16/AMX); weights, optimizer, validation and export stay float32.
    precision: str = "fp32"

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"TrainConfig.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}"
            )

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        return cls(
            two_tower=TwoTowerConfig(**d.pop("two_tower", {})),
            ranker=RankerConfig(**d.pop("ranker", {})),
            retrieval_schedule=StageSchedule(**d.pop("retrieval_schedule"))
            if "retrieval_schedule" in d
            else TrainConfig().retrieval_schedule,
            ranker_schedule=StageSchedule(**d.pop("ranker_schedule"))
            if "ranker_schedule" in d
            else TrainConfig().ranker_schedule,
            ranker_data=RankerData(**d.pop("ranker_data", {})),
            **{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()},
        )


# --- retrieval -------------------------------------------------------------------------------


MODEL_INPUTS = ("user_code", "user_features", "history", "item_code", "log_q")


def retrieval_loss(model: TwoTower, inputs: dict) -> torch.Tensor:
    """Ground truth only: the model's configured loss (in-batch softmax with logQ correction, or full)."""
    return model.retrieval_loss(**{k: inputs[k] for k in MODEL_INPUTS})


def ranker_loss(model: Ranker, inputs: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the ranker's logits against the list labels."""
    logits = model(**inputs)
    loss = F.binary_cross_entropy_with_logits(logits[mask], labels[mask].to(logits.dtype))
    return global_mean(loss, int(mask.sum()))


def train_retrieval(
    fold: Fold,
    config: TrainConfig,
    epochs: int | None = None,
    model: TwoTower | None = None,
    schedule: StageSchedule | None = None,
    loss_fn: Callable = retrieval_loss,
    name: str = "retrieval",
    checkpoint: StageCheckpoint | None = None,
) -> StageResult:
    """Fit a two-tower on the fold's rows, each predicting its item from the history before it.

    `model`, `schedule` and `loss_fn(model, inputs)` default to the teacher's; distillation
    passes a student and a loss that also listens to the teacher. `checkpoint`: see `run_epochs`.
    """
    rng = seed_everything(config.seed)
    model = model or TwoTower(config.two_tower, fold.space, fold.tables)
    schedule = schedule or config.retrieval_schedule
    popularity = np.bincount(fold.item_codes[fold.fit_positions], minlength=fold.dataset.n_items + 1)
    log_q = torch.from_numpy(np.log(np.maximum(popularity, 1) / popularity.sum()).astype(np.float32))
    fit_rows = fold.fit_positions
    if model.trains_all_positions:  # SASRec: one row per window, each of its positions a target
        fit_rows = fit_rows[window_rows(fold.split.user[fit_rows], fold.space.history_len)]

    def batches():
        positions = rng.permutation(fit_rows)
        for s in range(0, len(positions), schedule.batch_size):
            pos = positions[s : s + schedule.batch_size]
            pos = pos[local_slice(len(pos))]  # under DDP, this process's part of the global batch
            codes, features, history = fold.inputs_before(fold.split.user[pos], pos)  # the row left out
            yield {
                "user_code": torch.from_numpy(codes),
                "user_features": torch.from_numpy(features),
                "history": torch.from_numpy(history),
                "item_code": torch.from_numpy(fold.item_codes[pos]),
                "log_q": log_q,
                "rows": torch.from_numpy(pos),  # which examples these are, for losses that cache per example
            }

    return run_epochs(
        name,
        model,
        schedule,
        batches,
        lambda inputs: loss_fn(model, inputs),
        lambda m: evaluate_retrieval(m, fold),
        epochs,
        len(fit_rows),
        checkpoint,
        rng,
        config.autocast_dtype,
    )


# --- ranker ----------------------------------------------------------------------------------


def train_ranker(
    fold: Fold,
    retrieval: TwoTower,
    config: TrainConfig,
    epochs: int | None = None,
    retrieval_weights: tuple[float, ...] = (0.0,),
    model: Ranker | None = None,
    schedule: StageSchedule | None = None,
    loss_fn: Callable = ranker_loss,
    name: str = "ranker",
    checkpoint: StageCheckpoint | None = None,
) -> StageResult:
    """Fit a ranker on lists cut from the fold's sequences, candidates retrieved by `retrieval`.

    Validation scores the two-stage system for each retrieval weight of the blend and keeps
    the best; the chosen weight is the last entry of the returned history.
    """
    rng = seed_everything(config.seed + 1)
    model = model or Ranker(config.ranker, fold.space, fold.tables)
    schedule, data = schedule or config.ranker_schedule, config.ranker_data
    item_emb = item_embeddings(retrieval, fold.dataset.n_items)
    fitted = FittedPairs(
        csr_from_pairs(
            fold.split.user[fold.fit_positions], fold.split.item[fold.fit_positions], fold.dataset.n_users
        ),
        fold.dataset.n_items,
    )

    def batches():
        users, cut, cands, labels = ranker_lists(fold, retrieval, item_emb, fitted, data, rng)
        order = rng.permutation(len(users))
        for s in range(0, len(order), schedule.batch_size):
            take = order[s : s + schedule.batch_size]
            take = take[local_slice(len(take))]  # under DDP, this process's part of the global batch
            codes, features, history = fold.inputs_before(users[take], cut[take])
            inputs = {
                "user_code": torch.from_numpy(codes),
                "user_features": torch.from_numpy(features),
                "history": torch.from_numpy(history),
                "candidates": torch.from_numpy(np.maximum(cands[take], -1) + 1),
            }
            yield inputs, torch.from_numpy(labels[take]), torch.from_numpy(cands[take] >= 0)

    candidates = None  # the retrieval model is fixed: its candidates for validation, computed once

    def validate(m):
        nonlocal candidates
        if candidates is None:
            candidates = retrieve_candidates(retrieval, fold, data.candidates)
        by_weight = evaluate_ranked(m, fold, candidates, retrieval_weights)
        weight = max(by_weight, key=lambda w: by_weight[w]["ndcg@10"])
        return {
            **by_weight[weight],
            "retrieval_weight": weight,
            "ndcg@10_by_weight": {str(w): r["ndcg@10"] for w, r in by_weight.items()},
        }

    n_lists = int(min((fold.fit_counts >= 2).sum(), data.max_users or np.inf)) * data.cut_points
    result = run_epochs(
        name,
        model,
        schedule,
        batches,
        lambda batch: loss_fn(model, *batch),
        validate,
        epochs,
        n_lists,
        checkpoint,
        rng,
        config.autocast_dtype,
    )
    # The weight chosen together with the kept state (the best epoch), not the last epoch's.
    kept = result.history[result.epochs - 1].get("valid", {}) if epochs is None else {}
    result.history.append({"retrieval_weight": kept.get("retrieval_weight", retrieval_weights[0])})
    return result


# --- the teacher: both folds ------------------------------------------------------------------


@dataclass
class FoldModels:
    fold: Fold
    two_tower: TwoTower
    ranker: Ranker
    retrieval_weight: float
    retrieval: StageResult
    ranking: StageResult


def fit_fold(
    fold: Fold,
    config: TrainConfig,
    epochs: dict | None = None,
    retrieval_weight: float | None = None,
    checkpoints: Checkpoints | None = None,
) -> FoldModels:
    """Fit retrieval then ranker on `fold`: early-stopped when `epochs` is None, else exactly that long."""
    epochs = epochs or {}

    def checkpoint(stage: str) -> StageCheckpoint | None:
        return checkpoints.stage(f"{fold.name}-{stage}") if checkpoints else None

    log(f"== fitting on {fold.name} ({len(fold.fit_positions):,} interactions)")
    retrieval = train_retrieval(fold, config, epochs.get("retrieval"), checkpoint=checkpoint("retrieval"))
    weights = config.retrieval_weights if retrieval_weight is None else (retrieval_weight,)
    ranking = train_ranker(
        fold, retrieval.model, config, epochs.get("ranker"), weights, checkpoint=checkpoint("ranker")
    )
    weight = ranking.history[-1]["retrieval_weight"] if retrieval_weight is None else retrieval_weight
    return FoldModels(fold, retrieval.model, ranking.model, weight, retrieval, ranking)


def fit_teacher(
    selection_fold: Fold, final_fold: Fold, config: TrainConfig, checkpoints: Checkpoints | None = None
) -> tuple[FoldModels, FoldModels]:
    """PROTOCOL.md: choose epochs and the ranking blend on validation, then refit on train + valid.

    `checkpoints`: each stage of each fold saves every epoch there and resumes from it.
    """
    selected = fit_fold(selection_fold, config, checkpoints=checkpoints)
    epochs = {"retrieval": selected.retrieval.epochs, "ranker": selected.ranking.epochs}
    final = fit_fold(final_fold, config, epochs, selected.retrieval_weight, checkpoints)
    return selected, final
