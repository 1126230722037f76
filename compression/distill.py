"""Distillation: a small student two-tower and ranker learn from the labels and from the teacher.

Retrieval (ranking distillation, Tang & Wang, KDD 2018): besides the in-batch
softmax on the ground truth, the student matches the teacher's temperature-scaled
score distribution over a candidate set made of the batch's items plus the
teacher's own top candidates for the batch's users, so it learns the teacher's
ordering where it matters (the head of each list), not just the positives.

Ranking: on the same candidate lists the teacher ranker was trained on, the
student's logits are fitted to the labels and to the teacher's soft labels
sigmoid(teacher_logit / T).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from slimrec.models.checkpoint import StageCheckpoint
from slimrec.models.fold import Fold
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.train import (
    StageResult,
    StageSchedule,
    TrainConfig,
    retrieval_loss,
    train_ranker,
    train_retrieval,
)
from slimrec.models.two_tower import TwoTower, TwoTowerConfig


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
    retrieval_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=40, batch_size=1024, lr=3e-3, patience=4)
    )
    ranker_schedule: StageSchedule = field(
        default_factory=lambda: StageSchedule(max_epochs=8, batch_size=64, lr=2e-3, patience=2)
    )

    def __post_init__(self):
        if self.version != 1:
            raise ValueError(f"DistillConfig.version {self.version} is not supported (expected 1)")
        if not 0 <= self.label_weight <= 1:
            raise ValueError(f"DistillConfig.label_weight must be in [0, 1], got {self.label_weight}")
        if self.temperature <= 0:
            raise ValueError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
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


def retrieval_kd_loss(teacher: TwoTower, config: DistillConfig):
    """loss_fn for `train_retrieval`: label_weight * in-batch softmax + (1 - label_weight) * KL."""
    teacher.eval()
    with torch.no_grad():
        teacher_items = teacher.item_embeddings(len(teacher.item_tower.item_rows) - 1)
    t, a = config.temperature, config.label_weight
    cache = TeacherCache(config.teacher_candidates)

    def loss_fn(student: TwoTower, inputs: dict) -> torch.Tensor:
        label_loss = retrieval_loss(student, inputs)
        with torch.no_grad():
            u_t, top = cache.lookup(inputs, teacher, teacher_items)
            codes = torch.unique(torch.cat([inputs["item_code"], top.flatten()]))
            logits_t = u_t @ teacher_items[codes - 1].T / teacher.config.temperature
        u_s = student.user_tower(inputs["user_code"], inputs["user_features"], inputs["history"])
        logits_s = u_s @ student.item_tower(codes).T / student.config.temperature
        kd = (
            F.kl_div(
                F.log_softmax(logits_s / t, dim=1),
                F.log_softmax(logits_t / t, dim=1),
                log_target=True,
                reduction="batchmean",
            )
            * t
            * t
        )
        return a * label_loss + (1 - a) * kd

    return loss_fn


class TeacherCache:
    """The teacher's user embedding and top-M item codes per training example, computed once.

    The teacher is frozen and in eval mode, so these never change between epochs; caching
    them removes the teacher's forward pass, the costliest part of a distillation epoch.
    Examples are keyed by their row; caching stops at `max_bytes` (huge datasets recompute).
    """

    def __init__(self, m: int, max_bytes: int = 1 << 30):
        self.m, self.max_bytes = m, max_bytes
        self.emb: dict[int, torch.Tensor] = {}
        self.top: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def lookup(self, inputs: dict, teacher: TwoTower, teacher_items: torch.Tensor):
        rows = inputs.get("rows")
        keys = rows.tolist() if rows is not None else []
        if keys and all(k in self.emb for k in keys):
            return torch.stack([self.emb[k] for k in keys]), torch.stack([self.top[k] for k in keys])
        u_t = teacher.user_tower(inputs["user_code"], inputs["user_features"], inputs["history"])
        top = teacher_top_codes(u_t, teacher_items, self.m).view(len(u_t), -1)
        if rows is not None and self.bytes < self.max_bytes:
            for k, e, c in zip(keys, u_t, top, strict=True):
                self.emb[k], self.top[k] = e, c
            self.bytes += u_t.numel() * 4 + top.numel() * 8
        return u_t, top


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


def ranker_kd_loss(teacher: Ranker, config: DistillConfig):
    """loss_fn for `train_ranker`: BCE on labels mixed with BCE on the teacher's soft labels."""
    teacher.eval()
    t, a = config.temperature, config.label_weight

    def loss_fn(student: Ranker, inputs: dict, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        logits = student(**inputs)[mask]
        with torch.no_grad():
            soft = torch.sigmoid(teacher(**inputs)[mask] / t)
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
) -> StageResult:
    """Train (or, given `student`, fine-tune) a student two-tower; early-stopped when epochs is None."""
    student = student or TwoTower(config.student_two_tower, fold.space, fold.tables)
    return train_retrieval(
        fold,
        train_config,
        epochs,
        model=student,
        schedule=schedule or config.retrieval_schedule,
        loss_fn=retrieval_kd_loss(teacher, config),
        name=name,
        checkpoint=checkpoint,
    )


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
        loss_fn=ranker_kd_loss(teacher, config),
        name=name,
        checkpoint=checkpoint,
    )
