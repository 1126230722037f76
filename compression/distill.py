"""Distillation: a small student two-tower and ranker learn from the labels and from the teacher.

Retrieval (ranking distillation, Tang & Wang, KDD 2018): besides the softmax on the
ground truth, the student matches the teacher's temperature-scaled score distribution,
over the whole catalogue when it is small enough to score every step (ML-100K, ML-1M),
else over the batch's items plus the teacher's own top candidates for the batch's users,
so it learns the teacher's ordering where it matters (the head of each list).

Ranking: on the same candidate lists the teacher ranker was trained on, the
student's logits are fitted to the labels and to the teacher's soft labels
sigmoid(teacher_logit / T).

New users: `history_only_fraction` of the examples show the student the user as a new
user's request does (no id, no side features, the history only) while the targets stay
the teacher's for the known user, so the student's history path learns to stand alone.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import TypeVar

import torch
import torch.nn.functional as F
from slimrec.artifact.features import FeatureSpace
from slimrec.artifact.user_state import sent_user_features
from slimrec.models.checkpoint import StageCheckpoint
from slimrec.models.device import training_device
from slimrec.models.evaluate import evaluate_ranked, retrieve_candidates
from slimrec.models.fold import Fold
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.stage_times import StageTimes
from slimrec.models.train import (
    StageResult,
    StageSchedule,
    TrainConfig,
    log,
    retrieval_loss,
    train_ranker,
    train_retrieval,
)
from slimrec.models.two_tower import FULL_SOFTMAX_MAX_ITEMS, TwoTower, TwoTowerConfig
from torch import nn

TEACHER_PRECISIONS = ("auto", "fp32", "bf16")
RANKER_INITS = ("auto", "teacher", "scratch")


@dataclass
class DistillConfig:
    version: int = 1
    student_two_tower: TwoTowerConfig = field(
        default_factory=lambda: TwoTowerConfig(
            id_dim=48, feature_dim=8, user_hidden=(256,), item_hidden=(128,), out_dim=48, temperature=0.05
        )
    )
    student_ranker: RankerConfig = field(
        default_factory=lambda: RankerConfig(
            id_dim=32, feature_dim=8, n_cross=2, cross_rank=32, deep=(256, 64)
        )
    )
    label_weight: float = 0.5  # weight of the ground-truth loss; the teacher's gets 1 - label_weight
    temperature: float = 1.0  # softens both score distributions in the KL term
    teacher_candidates: int = 50  # teacher's top items per example added to the candidate set
    # Share of training examples the student sees as a new user sends them (no id, no side
    # features, the history only), still fitted to the teacher's scores for the known user:
    # the history path learns to stand alone, as it must for users known only by their history.
    history_only_fraction: float = 0.25
    # The frozen teacher's forward passes (its soft labels): "bf16" autocast halves the ranker
    # teacher's time on CPUs with native bfloat16 (soft labels move by ~0.003); "auto" uses it
    # where oneDNN reports bfloat16 support, else float32.
    teacher_precision: str = "auto"
    # Short schedules (issue 13: `slimrec compress` on ML-100K in about two minutes): batches of
    # 256 reach in 3-5 epochs what batches of 1024 did in 10; the ranker gains little after 2-3.
    retrieval_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=4, batch_size=256, lr=3e-3, patience=1)
    )
    ranker_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=2, batch_size=128, lr=3e-3, patience=1)
    )
    # Where the student ranker starts: "scratch", a new `student_ranker`; "teacher", a copy of the
    # teacher's ranker (same config required), kept as it is (only the blend weight is chosen on
    # validation; pruning's fine-tune then fits it to the student's candidates); "auto", the
    # teacher's when its config equals `student_ranker`. A teacher ranker already of the
    # student's size has nothing to distil: ml-100k, seed 0, the distilled one reached valid
    # two-stage NDCG@10 0.194 in 2 epochs (~11 s a fold), below the teacher's own 0.204.
    # Whole `slimrec compress`, seed 0, 2 cores: ml-100k 106 s wall (was 132), test two-stage
    # 1.023x the teacher; ML-1M (teacher-sequence teacher, --threads 1) 37 min, 3.5 GiB peak,
    # test 0.998x, promotable (valid 0.2419 vs 0.2435; the student stage alone 0.2470).
    ranker_init: str = "auto"

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"DistillConfig.version {self.version} is not supported (expected 1)")
        if not 0 <= self.label_weight <= 1:
            raise ValueError(f"DistillConfig.label_weight must be in [0, 1], got {self.label_weight}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
        if not 0 <= self.history_only_fraction <= 1:
            raise ValueError(
                f"DistillConfig.history_only_fraction must be in [0, 1], got {self.history_only_fraction}"
            )
        if self.teacher_precision not in TEACHER_PRECISIONS:
            raise ValueError(
                f"DistillConfig.teacher_precision must be one of {TEACHER_PRECISIONS}, "
                f"got {self.teacher_precision!r}"
            )
        if self.ranker_init not in RANKER_INITS:
            raise ValueError(
                f"DistillConfig.ranker_init must be one of {RANKER_INITS}, got {self.ranker_init!r}"
            )
        if self.teacher_candidates < 0:
            raise ValueError(f"DistillConfig.teacher_candidates must be >= 0, got {self.teacher_candidates}")
        for name, cls in (
            ("student_two_tower", TwoTowerConfig),
            ("student_ranker", RankerConfig),
            ("retrieval_schedule", StageSchedule),
            ("ranker_schedule", StageSchedule),
        ):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls(**getattr(self, name)))

    def to_dict(self) -> dict:
        return asdict(self)


def retrieval_kd_loss(
    teacher: TwoTower,
    config: DistillConfig,
    cache: TeacherCache | None = None,
    new_user_features: torch.Tensor | None = None,
):
    """loss_fn for `train_retrieval`: label_weight * label loss + (1 - label_weight) * KL.

    Catalogues of up to FULL_SOFTMAX_MAX_ITEMS items are scored whole: the student's user
    and item towers run once per step, the label loss is the full softmax and the KL spans
    every item. Larger ones use the student's own loss and a KL over the batch's items plus
    the teacher's top `teacher_candidates` per example.

    `cache` holds the teacher's per-example outputs (pass one to share it between
    distillation and fine-tuning); `new_user_features` [F], the side features of a user
    who sends none, is what `history_only_fraction` of the examples show the student.
    """
    teacher = on_training_device(teacher)
    n_items = len(teacher.item_tower.item_rows) - 1
    with torch.no_grad():
        teacher_items = teacher.item_embeddings(n_items)
        scaled_items = teacher_items / teacher.config.temperature  # logits_t = u_t @ scaled_items.T
    t, a = config.temperature, config.label_weight
    cache = cache or TeacherCache(config.teacher_candidates)
    precision = teacher_precision(config.teacher_precision)  # once, not every step
    whole = n_items <= FULL_SOFTMAX_MAX_ITEMS

    def loss_fn(student: TwoTower, inputs: dict) -> torch.Tensor:
        with torch.no_grad(), teacher_autocast(precision):
            u_t, top = cache.lookup(inputs, teacher, teacher_items, 0 if whole else None)
            u_t = u_t.float()
        seen = as_new_users(inputs, config.history_only_fraction, new_user_features)
        u_s = student.user_tower(seen["user_code"], seen["user_features"], seen["history"])
        u_s = u_s / student.config.temperature  # [B, d], cheaper to scale than [B, items] logits
        if whole and not student.trains_all_positions:
            codes = torch.arange(1, n_items + 1, device=u_s.device)
            with torch.no_grad(), teacher_autocast(precision):
                logits_t = (u_t @ scaled_items.T).float()
        else:
            with torch.no_grad():
                if top is None:  # the whole-catalogue cache holds no top codes: rank them now
                    top = teacher_top_codes(u_t, teacher_items, config.teacher_candidates).view(len(u_t), -1)
                codes = torch.unique(torch.cat([inputs["item_code"], top.flatten()]))
                logits_t = u_t @ scaled_items[codes - 1].T
        logits_s = u_s @ student.item_tower(codes).T
        log_p = F.log_softmax(logits_s / t if t != 1 else logits_s, dim=1)
        if not a:
            label_loss = logits_s.new_zeros(())
        elif not whole or student.trains_all_positions:
            label_loss = retrieval_loss(student, seen)  # the student's own loss (in-batch, logQ)
        elif t == 1:  # the full softmax, from the log-softmax the KL reads too
            label_loss = F.nll_loss(log_p, inputs["item_code"] - 1)
        else:
            label_loss = F.cross_entropy(logits_s, inputs["item_code"] - 1)
        if a == 1:
            return label_loss
        kd = (
            F.kl_div(log_p, F.log_softmax(logits_t / t, dim=1), log_target=True, reduction="batchmean")
            * t
            * t
        )
        return a * label_loss + (1 - a) * kd

    return loss_fn


def teacher_precision(precision: str) -> str:
    """`DistillConfig.teacher_precision` resolved for the training device ("auto": bf16 where native)."""
    if precision != "auto":
        return precision
    if training_device().type != "cpu":
        return "bf16"  # GPUs the project meets (Ampere and later) run bfloat16 natively
    try:
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    except (AttributeError, RuntimeError):
        return "fp32"


def teacher_autocast(precision: str):
    """The autocast context the teacher's forward passes run under (a resolved `teacher_precision`)."""
    return torch.autocast(training_device().type, dtype=torch.bfloat16, enabled=precision == "bf16")


Teacher = TypeVar("Teacher", bound=nn.Module)


def on_training_device(teacher: Teacher) -> Teacher:
    """The frozen teacher, in eval mode, on the device the student trains on: the model itself
    on the CPU, else a copy (the caller's teacher stays on the CPU for export and evaluation)."""
    device = training_device()
    teacher = teacher if device.type == "cpu" else copy.deepcopy(teacher).to(device)
    return teacher.eval()


def as_new_users(inputs: dict, fraction: float, new_user_features: torch.Tensor | None) -> dict:
    """`inputs` with a random `fraction` of its rows sent as new users send them: user code 0
    and `new_user_features` (default: all 0, unknown), the history kept."""
    if not fraction:
        return inputs
    codes, features = inputs["user_code"], inputs["user_features"]
    hide = torch.rand(len(codes), device=codes.device) < fraction
    unknown = torch.zeros_like(features[0]) if new_user_features is None else new_user_features.to(features)
    return {
        **inputs,
        "user_code": codes.masked_fill(hide, 0),
        "user_features": torch.where(hide.unsqueeze(1), unknown, features),
    }


def new_user_feature_codes(space: FeatureSpace) -> torch.Tensor:
    """int64 [F]: the side features serving encodes for a user who sends none."""
    return torch.from_numpy(sent_user_features(space, [{}])[0])


class TeacherCache:
    """The teacher's user embedding (and top-M item codes) per training example, computed once.

    The teacher is frozen and in eval mode, so these never change between epochs, nor
    between distillation and fine-tuning on the same fold; caching them removes the
    teacher's forward pass, the costliest part of a distillation epoch. Examples are keyed
    by their row (protocol position) in dense tables; past `max_bytes` nothing is cached.
    """

    def __init__(self, m: int, max_bytes: int = 1 << 30):
        self.m, self.max_bytes = m, max_bytes
        self.emb = torch.zeros(0, 0)
        self.top = torch.zeros(0, 0, dtype=torch.int32)
        self.filled = torch.zeros(0, dtype=torch.bool)

    def lookup(self, inputs: dict, teacher: TwoTower, teacher_items: torch.Tensor, m: int | None = None):
        """(u_t [B, D], top codes [B, m] or None when m == 0) of the batch's examples."""
        m = self.m if m is None else m
        rows = inputs.get("rows")
        if rows is not None and len(rows) and self._holds(rows, m):
            return self.emb[rows], (self.top[rows].long() if m else None)
        u_t = teacher.user_tower(inputs["user_code"], inputs["user_features"], inputs["history"])
        top = teacher_top_codes(u_t, teacher_items, m).view(len(u_t), -1) if m else None
        if rows is not None and len(rows):
            self._store(rows, u_t, top)
        return u_t, top

    def _holds(self, rows: torch.Tensor, m: int) -> bool:
        within = int(rows.max()) < len(self.filled)
        return within and (m == 0 or self.top.shape[1] == m) and bool(self.filled[rows].all())

    def _store(self, rows: torch.Tensor, u_t: torch.Tensor, top: torch.Tensor | None) -> None:
        n, width = int(rows.max()) + 1, 0 if top is None else top.shape[1]
        if width != self.top.shape[1]:  # another candidate count: start over
            self.filled = torch.zeros(0, dtype=torch.bool)
        if n > len(self.filled):
            capacity, kept = max(n, 2 * len(self.filled)), len(self.filled)
            if capacity * (u_t.shape[1] + width) * 4 > self.max_bytes:
                return
            device = u_t.device  # the cache lives where the student trains: rows index it there
            emb = torch.zeros(capacity, u_t.shape[1], device=device)
            tops = torch.zeros(capacity, width, dtype=torch.int32, device=device)
            filled = torch.zeros(capacity, dtype=torch.bool, device=device)
            if kept:
                emb[:kept], tops[:kept], filled[:kept] = self.emb[:kept], self.top[:kept], self.filled
            self.emb, self.top, self.filled = emb, tops, filled
        self.emb[rows] = u_t.detach().to(self.emb)
        if top is not None:
            self.top[rows] = top.to(torch.int32)
        self.filled[rows] = True


def teacher_top_codes(
    user_emb: torch.Tensor, item_emb: torch.Tensor, m: int, chunk: int = 262144
) -> torch.Tensor:
    """Item codes of the teacher's top-m items per user (flattened), scanning items in chunks
    so a million-item catalogue never needs a [batch, n_items] score matrix."""
    if m == 0:
        return torch.zeros(0, dtype=torch.long)
    best_scores: torch.Tensor | None = None
    best_idx: torch.Tensor | None = None  # set together with best_scores
    for s in range(0, len(item_emb), chunk):
        scores = user_emb @ item_emb[s : s + chunk].T
        top = scores.topk(min(m, scores.shape[1]), dim=1)
        idx = top.indices + s
        if best_scores is not None and best_idx is not None:
            merged = torch.cat([best_scores, top.values], 1).topk(m, dim=1)
            idx = torch.cat([best_idx, idx], 1).gather(1, merged.indices)
            top = merged
        best_scores, best_idx = top.values, idx
    if best_idx is None:
        raise ValueError("teacher_top_codes: item_emb has no rows to rank")
    return best_idx.flatten() + 1


def ranker_kd_loss(teacher: Ranker, config: DistillConfig, new_user_features: torch.Tensor | None = None):
    """loss_fn for `train_ranker`: BCE on labels mixed with BCE on the teacher's soft labels.

    The teacher scores each list as the known user; `history_only_fraction` of the lists
    show the student the user as a new one (`as_new_users`), as a history-only request is served.
    """
    teacher = on_training_device(teacher)
    t, a = config.temperature, config.label_weight
    precision = teacher_precision(config.teacher_precision)

    def loss_fn(student: Ranker, inputs: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        seen = as_new_users(inputs, config.history_only_fraction, new_user_features)
        logits = student(**seen)[mask]
        if a == 1:
            return F.binary_cross_entropy_with_logits(logits, labels[mask])
        with torch.no_grad(), teacher_autocast(precision):
            soft = torch.sigmoid(teacher(**inputs)[mask].float() / t)
        return (
            a * F.binary_cross_entropy_with_logits(logits, labels[mask])
            + (1 - a) * F.binary_cross_entropy_with_logits(logits / t, soft) * t * t
        )

    return loss_fn


def distill_two_tower(
    teacher: TwoTower,
    fold: Fold,
    train_config: TrainConfig,
    config: DistillConfig,
    epochs: int | None = None,
    student: TwoTower | None = None,
    schedule: StageSchedule | None = None,
    name: str = "student retrieval",
    checkpoint: StageCheckpoint | None = None,
    cache: TeacherCache | None = None,
) -> StageResult:
    """Train (or, given `student`, fine-tune) a student two-tower; early-stopped when epochs is None.

    `cache`: the teacher's outputs per example on this fold (`TeacherCache`), shared by the
    stages that pass the same one.
    """
    student = student or TwoTower(config.student_two_tower, fold.space, fold.tables)
    return train_retrieval(
        fold,
        train_config,
        epochs,
        model=student,
        schedule=schedule or config.retrieval_schedule,
        loss_fn=retrieval_kd_loss(teacher, config, cache, new_user_feature_codes(fold.space)),
        name=name,
        checkpoint=checkpoint,
    )


def ranker_from_teacher(teacher: Ranker, config: DistillConfig) -> bool:
    """Whether the student ranker starts as the teacher's (`DistillConfig.ranker_init`)."""
    if config.ranker_init == "scratch":
        return False
    same = teacher.config.architecture() == config.student_ranker.architecture()
    if config.ranker_init == "teacher" and not same:
        raise ValueError(
            "DistillConfig.ranker_init = 'teacher' needs student_ranker of the teacher's ranker's "
            f"architecture ({teacher.config.architecture()}), got {config.student_ranker.architecture()}"
        )
    return same


def teacher_ranker_stage(
    teacher: Ranker,
    retrieval: TwoTower,
    fold: Fold,
    train_config: TrainConfig,
    retrieval_weights: tuple[float, ...] = (0.0,),
) -> StageResult:
    """The teacher's ranker, copied, as the student's: no training. With several retrieval
    weights the blend's is chosen on the fold's validation users, as `train_ranker` does; with
    one (the final fold) nothing is scored. The chosen weight is the history's last entry."""
    started, times = time.perf_counter(), StageTimes()
    ranker = copy.deepcopy(teacher).eval()
    weight = retrieval_weights[0]
    history: list[dict] = []
    if len(retrieval_weights) > 1:
        with times.stage("validation"):
            candidates = retrieve_candidates(retrieval, fold, train_config.ranker_data.candidates)
            by_weight = evaluate_ranked(ranker, fold, candidates, retrieval_weights)
        weight = max(by_weight, key=lambda w: by_weight[w]["ndcg@10"])
        by_name = {str(w): r["ndcg@10"] for w, r in by_weight.items()}
        history.append({"epoch": 0, "valid": {**by_weight[weight], "ndcg@10_by_weight": by_name}})
        score = by_weight[weight]["ndcg@10"]
        log(f"student ranker: the teacher's, blend weight {weight} (valid ndcg@10 {score:.4f})")
    history.append({"retrieval_weight": weight})
    return StageResult(ranker, 0, history, time.perf_counter() - started, times.to_dict())


def distill_ranker(
    teacher: Ranker,
    retrieval: TwoTower,
    fold: Fold,
    train_config: TrainConfig,
    config: DistillConfig,
    epochs: int | None = None,
    retrieval_weights: tuple[float, ...] = (0.0,),
    student: Ranker | None = None,
    schedule: StageSchedule | None = None,
    name: str = "student ranker",
    checkpoint: StageCheckpoint | None = None,
) -> StageResult:
    """Train (or fine-tune) a student ranker on lists retrieved by the student `retrieval` model."""
    student = student or Ranker(config.student_ranker, fold.space, fold.tables)
    return train_ranker(
        fold,
        retrieval,
        train_config,
        epochs,
        retrieval_weights,
        model=student,
        schedule=schedule or config.ranker_schedule,
        loss_fn=ranker_kd_loss(teacher, config, new_user_feature_codes(fold.space)),
        name=name,
        checkpoint=checkpoint,
    )
