"""Training: the retrieval two-tower, then the DCN-v2 ranker on its candidate lists.

Reads top to bottom: `fit_teacher` runs both stages on one `Fold`. With
`epochs=None` a stage early-stops on the fold's scored split (validation) and
keeps its best state; with a number it trains exactly that long (the refit on
train + validation, which must not look at test).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from slimrec.artifact.user_state import gather_ranges
from slimrec.models.csr import csr_from_pairs
from slimrec.models.evaluate import (
    evaluate_retrieval,
    evaluate_two_stage,
    exact_top_k,
    item_embeddings,
)
from slimrec.models.fold import Fold
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.sequence_tower import window_rows
from slimrec.models.two_tower import TwoTower, TwoTowerConfig
from tqdm import tqdm


@dataclass
class StageSchedule:
    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping

    def __post_init__(self):
        if self.max_epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ValueError(f"invalid StageSchedule: {self}")


@dataclass
class RankerData:
    """How the ranker's training lists are drawn from the fitted rows."""

    cut_points: int = 4  # per user per epoch: prediction times inside the fitted sequence
    max_positives: int = 10  # the next interactions after a cut point
    hard_negatives: int = 30  # retrieved candidates the user never interacted with
    random_negatives: int = 10
    candidates: int = 200
    max_users: int | None = None  # sample this many users per epoch (large catalogues); None = all


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


@dataclass
class StageResult:
    model: torch.nn.Module
    epochs: int  # epochs of the kept state
    history: list[dict]  # per epoch: loss, examples/s, validation metrics when scored
    seconds: float


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


# --- retrieval -------------------------------------------------------------------------------


MODEL_INPUTS = ("user_code", "user_features", "history", "item_code", "log_q")


def retrieval_loss(model: TwoTower, inputs: dict) -> torch.Tensor:
    """Ground truth only: the model's configured loss (in-batch softmax with logQ correction, or full)."""
    return model.retrieval_loss(**{k: inputs[k] for k in MODEL_INPUTS})


def ranker_loss(model: Ranker, inputs: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the ranker's logits against the list labels."""
    logits = model(**inputs)
    return F.binary_cross_entropy_with_logits(logits[mask], labels[mask])


def train_retrieval(
    fold: Fold,
    config: TrainConfig,
    epochs: int | None = None,
    model: TwoTower | None = None,
    schedule: StageSchedule | None = None,
    loss_fn: Callable = retrieval_loss,
    name: str = "retrieval",
) -> StageResult:
    """Fit a two-tower on the fold's rows, each predicting its item from the history before it.

    `model`, `schedule` and `loss_fn(model, inputs)` default to the teacher's; distillation
    passes a student and a loss that also listens to the teacher.
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
            yield positions[s : s + schedule.batch_size]

    def step(pos: np.ndarray) -> torch.Tensor:
        codes, features, history = fold.inputs_before(fold.split.user[pos], pos)  # the row itself left out
        return loss_fn(
            model,
            {
                "user_code": torch.from_numpy(codes),
                "user_features": torch.from_numpy(features),
                "history": torch.from_numpy(history),
                "item_code": torch.from_numpy(fold.item_codes[pos]),
                "log_q": log_q,
                "rows": torch.from_numpy(pos),  # which examples these are, for losses that cache per example
            },
        )

    return run_epochs(
        name,
        model,
        schedule,
        batches,
        step,
        lambda m: evaluate_retrieval(m, fold),
        epochs,
        len(fit_rows),
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
) -> StageResult:
    """Fit a ranker on lists cut from the fold's sequences, candidates retrieved by `retrieval`.

    Validation scores the two-stage system for each retrieval weight of the blend and keeps
    the best; the chosen weight is the last entry of the returned history.
    """
    rng = seed_everything(config.seed + 1)
    model = model or Ranker(config.ranker, fold.space, fold.tables)
    schedule, data = schedule or config.ranker_schedule, config.ranker_data
    item_emb = item_embeddings(retrieval, fold.dataset.n_items)
    fitted = csr_from_pairs(
        fold.split.user[fold.fit_positions], fold.split.item[fold.fit_positions], fold.dataset.n_users
    )

    def batches():
        lists = ranker_lists(fold, retrieval, item_emb, fitted, data, rng)
        order = rng.permutation(len(lists[0]))
        for s in range(0, len(order), schedule.batch_size):
            yield tuple(a[order[s : s + schedule.batch_size]] for a in lists)

    def step(batch) -> torch.Tensor:
        users, cut, cands, labels = batch
        codes, features, history = fold.inputs_before(users, cut)
        inputs = {
            "user_code": torch.from_numpy(codes),
            "user_features": torch.from_numpy(features),
            "history": torch.from_numpy(history),
            "candidates": torch.from_numpy(np.maximum(cands, -1) + 1),
        }
        return loss_fn(model, inputs, torch.from_numpy(labels), torch.from_numpy(cands >= 0))

    def validate(m):
        by_weight = evaluate_two_stage(retrieval, m, fold, data.candidates, retrieval_weights)
        weight = max(by_weight, key=lambda w: by_weight[w]["ndcg@10"])
        return {
            **by_weight[weight],
            "retrieval_weight": weight,
            "ndcg@10_by_weight": {str(w): r["ndcg@10"] for w, r in by_weight.items()},
        }

    n_lists = int(min((fold.fit_counts >= 2).sum(), data.max_users or np.inf)) * data.cut_points
    result = run_epochs(name, model, schedule, batches, step, validate, epochs, n_lists)
    # The weight chosen together with the kept state (the best epoch), not the last epoch's.
    kept = result.history[result.epochs - 1].get("valid", {}) if epochs is None else {}
    result.history.append({"retrieval_weight": kept.get("retrieval_weight", retrieval_weights[0])})
    return result


def ranker_lists(
    fold: Fold, retrieval: TwoTower, item_emb: np.ndarray, fitted, data: RankerData, rng: np.random.Generator
):
    """One epoch of training lists: (users [L], cut [L], candidates [L, C], labels [L, C]).

    A cut point is a prediction time inside a user's fitted sequence; its positives are the
    next interactions, its negatives retrieved candidates and random items the user never rated.
    """
    counts = fold.fit_counts
    eligible = np.flatnonzero(counts >= 2)
    if data.max_users is not None and len(eligible) > data.max_users:
        eligible = np.sort(rng.choice(eligible, data.max_users, replace=False))
    users = np.repeat(eligible, data.cut_points)
    start = fold.split.user_start[users]
    n = counts[users]
    # Cut somewhere in the second half, where the history resembles serving time.
    cut = start + n // 2 + (rng.random(len(users)) * (n - n // 2)).astype(np.int64)
    cut = np.minimum(cut, start + n - 1)
    n_pos = np.minimum(data.max_positives, np.maximum(1, np.round(0.1 * n))).astype(np.int64)
    n_pos = np.minimum(n_pos, start + n - cut)

    codes, features, history = fold.inputs_before(users, cut)
    with torch.no_grad():
        retrieval.eval()
        u_emb = retrieval.user_tower(
            torch.from_numpy(codes), torch.from_numpy(features), torch.from_numpy(history)
        ).numpy()
    exclude = gather_ranges(fold.split.item, start, cut)  # the items before the cut, as at serving time
    retrieved, _ = exact_top_k(u_emb, item_emb, data.candidates, exclude)

    width = data.max_positives + data.hard_negatives + data.random_negatives
    cands = np.full((len(users), width), -1, np.int64)
    labels = np.zeros((len(users), width), np.float32)
    offs = np.arange(data.max_positives)
    pos_ok = offs[None, :] < n_pos[:, None]
    pos_items = fold.split.item[np.minimum(cut[:, None] + offs[None, :], len(fold.split.item) - 1)]
    cands[:, : data.max_positives] = np.where(pos_ok, pos_items, -1)
    labels[:, : data.max_positives] = pos_ok

    never_rated = ~_member(users, retrieved, fitted, fold.dataset.n_items)
    hard = _sample_true(never_rated & (retrieved >= 0), data.hard_negatives, rng)
    cands[:, data.max_positives : data.max_positives + data.hard_negatives] = np.where(
        hard >= 0, np.take_along_axis(retrieved, np.maximum(hard, 0), 1), -1
    )
    randoms = rng.integers(0, fold.dataset.n_items, size=(len(users), data.random_negatives))
    randoms = np.where(_member(users, randoms, fitted, fold.dataset.n_items), -1, randoms)
    cands[:, -data.random_negatives :] = randoms
    return users, cut, cands, labels


def _member(users: np.ndarray, items: np.ndarray, csr, n_items: int) -> np.ndarray:
    """[L, C] bool: is items[l, c] among user users[l]'s items in csr (by user index)."""
    indptr, members = csr
    keys = np.sort(np.repeat(np.arange(len(indptr) - 1), np.diff(indptr)) * (n_items + 1) + members)
    query = users[:, None].astype(np.int64) * (n_items + 1) + items
    found = np.searchsorted(keys, query)
    return (found < len(keys)) & (keys[np.minimum(found, len(keys) - 1)] == query)


def _sample_true(ok: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per row, up to k random column indices where ok is True (-1 padding)."""
    keys = np.where(ok, rng.random(ok.shape), 2.0)
    picked = np.argsort(keys, axis=1)[:, :k]
    return np.where(np.take_along_axis(ok, picked, 1), picked, -1)


# --- the shared epoch loop ---------------------------------------------------------------------


def run_epochs(
    name: str,
    model: torch.nn.Module,
    schedule: StageSchedule,
    batches: Callable,
    step: Callable,
    validate: Callable,
    epochs: int | None,
    n_examples: int,
) -> StageResult:
    """AdamW over `batches()` each epoch; `step(batch)` returns the loss.

    epochs=None: validate after every epoch, stop after `patience` epochs without a better
    NDCG@10 and restore the best state. A number: train exactly that long, never validate.
    """
    # fused: one vectorised kernel per step; the default per-tensor loop takes seconds a step
    # over a million-row embedding table (dense gradients), the fused one a tenth of a second.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay, fused=True
    )
    fixed = epochs is not None
    total = epochs if fixed else schedule.max_epochs
    best, best_state, best_epoch, stale, history = -1.0, None, 0, 0, []
    started = time.perf_counter()
    for epoch in range(1, total + 1):
        model.train()
        t0, losses = time.perf_counter(), []
        for batch in tqdm(
            batches(),
            desc=f"{name} epoch {epoch}/{total}",
            leave=False,
            file=sys.stderr,
            total=-(-n_examples // schedule.batch_size),
            disable=None,
        ):
            loss = step(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "examples_per_s": n_examples / seconds}
        if not fixed:
            row["valid"] = validate(model)
        history.append(row)
        score = row.get("valid", {}).get("ndcg@10")
        log(
            f"{name} epoch {epoch}/{total}  loss {row['loss']:.4f}  {row['examples_per_s']:,.0f} ex/s"
            + (f"  valid ndcg@10 {score:.4f} recall@200 {row['valid']['recall@200']:.4f}" if score else "")
        )
        if fixed:
            continue
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= schedule.patience:
                log(f"{name}: stopping, best valid ndcg@10 {best:.4f} at epoch {best_epoch}")
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return StageResult(model, epochs if fixed else max(best_epoch, 1), history, time.perf_counter() - started)


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
    fold: Fold, config: TrainConfig, epochs: dict | None = None, retrieval_weight: float | None = None
) -> FoldModels:
    """Fit retrieval then ranker on `fold`: early-stopped when `epochs` is None, else exactly that long."""
    epochs = epochs or {}
    log(f"== fitting on {fold.name} ({len(fold.fit_positions):,} interactions)")
    retrieval = train_retrieval(fold, config, epochs.get("retrieval"))
    weights = config.retrieval_weights if retrieval_weight is None else (retrieval_weight,)
    ranking = train_ranker(fold, retrieval.model, config, epochs.get("ranker"), weights)
    weight = ranking.history[-1]["retrieval_weight"] if retrieval_weight is None else retrieval_weight
    return FoldModels(fold, retrieval.model, ranking.model, weight, retrieval, ranking)


def fit_teacher(selection_fold: Fold, final_fold: Fold, config: TrainConfig) -> tuple[FoldModels, FoldModels]:
    """PROTOCOL.md: choose epochs and the ranking blend on validation, then refit on train + valid."""
    selected = fit_fold(selection_fold, config)
    epochs = {"retrieval": selected.retrieval.epochs, "ranker": selected.ranking.epochs}
    final = fit_fold(final_fold, config, epochs, selected.retrieval_weight)
    return selected, final
