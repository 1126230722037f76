"""Named training configurations, and TOML overrides on top of them.

"teacher" is the full model with the pooled history; "teacher-sequence" the same two-stage
teacher whose user tower reads the history with causal self-attention (SASRec) and trains
with a full softmax; `default_preset` names the one validation chose for a dataset (see
`TEACHER_BY_DATASET`). "tiny" is the smoke run the tests use (seconds on ml-100k).
Imports no torch at module level: `slimrec serve`'s parser lists the preset names.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

TRAIN_PRESETS: dict[str, dict] = {
    # tau 0.1 over 0.05: higher validation recall@200 at every epoch (0.749 vs 0.743 at the kept
    # epoch), the ceiling of the two-stage system; validation NDCG@10 within one standard error.
    # Decoupled weight decay 4 on the two-tower: without it the big id tables overfit by epoch 5.
    # Retrieval alone, kept epoch, validation NDCG@10 / recall@200 over weight decay 0, 0.5, 1, 2, 4:
    # 0.168/0.748, 0.178/0.747, 0.179/0.752, 0.186/0.757, 0.193/0.763 (seed 0; larger not tried).
    "teacher": {"two_tower": {"temperature": 0.1}, "retrieval_schedule": {"weight_decay": 4.0}},
    # One row per window of history_len items per user, each position predicting the next
    # (SASRec), over the whole catalogue ("auto": full softmax up to 20,000 items). Rows are
    # ~1/40 as many as the pooled teacher's, so smaller batches keep the steps per epoch up.
    # The user MLP narrows to (256,): it runs at every position; (1024, 512) cost ~2x a step.
    "teacher-sequence": {
        "two_tower": {
            "temperature": 0.1,
            "history_encoder": "attention",
            "loss": "auto",
            "user_hidden": [256],
        },
        "retrieval_schedule": {"batch_size": 64, "weight_decay": 0.5, "max_epochs": 60, "patience": 4},
    },
    "tiny": {
        "two_tower": {
            "id_dim": 16,
            "feature_dim": 4,
            "user_hidden": [32],
            "item_hidden": [32],
            "out_dim": 16,
        },
        "ranker": {"id_dim": 8, "feature_dim": 4, "n_cross": 1, "deep": [16]},
        "retrieval_schedule": {"max_epochs": 2, "batch_size": 1024, "lr": 5e-3, "patience": 1},
        "ranker_schedule": {"max_epochs": 1, "batch_size": 128, "lr": 2e-3, "patience": 1},
        "ranker_data": {"cut_points": 1, "hard_negatives": 10, "random_negatives": 5},
        "history_len": 20,
    },
}


# The teacher preset validation chose per dataset (PROTOCOL.md validation, seed 0); a dataset
# not listed gets "teacher": train both and compare their validation figures to choose.
# ml-100k, validation NDCG@10 of the kept retrieval epoch: pooled 0.193, attention 0.174 (epoch
# 13 of 17); the attention teacher's two-stage 0.185 at its best ranker epoch (4), test 0.154
# (the pooled teacher's test: 0.164).
# ml-1m, retrieval alone: pooled 0.186 (issue 13; SASRec with a full softmax 0.216); this
# attention teacher 0.096, 0.130, 0.156, 0.172, 0.189 after epochs 1-5 (batch 128), still rising
# when stopped: no converged ML-1M run yet, and no two-stage figure.
TEACHER_BY_DATASET = {"ml-100k": "teacher", "ml-1m": "teacher-sequence"}


def default_preset(data: str | Path) -> str:
    """The teacher preset chosen on validation for `data` (a dataset name or directory), else "teacher".

    Example:
        >>> default_preset("../shared/data/ml-1m"), default_preset("my-shop")
        ('teacher-sequence', 'teacher')
    """
    return TEACHER_BY_DATASET.get(Path(data).name, "teacher")


def merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values; nested tables merge key by key instead of replacing."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


def merge_toml(values: dict, toml_path: Path | None) -> dict:
    """`values` overridden by the tables of a TOML file (none: unchanged); a broken file names itself."""
    if toml_path is None:
        return values
    try:
        return merge(values, tomllib.loads(Path(toml_path).read_text()))
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{toml_path}: not valid TOML ({exc})") from None


def train_config(preset: str, toml_path: Path | None = None, seed: int | None = None):
    """The preset, overridden by a TOML file's tables, then by --seed; unknown keys are errors."""
    from slimrec.models.train import TrainConfig  # torch: only the commands that train pay for it

    if preset not in TRAIN_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TRAIN_PRESETS)}")
    values = merge_toml(merge(TrainConfig().to_dict(), TRAIN_PRESETS[preset]), toml_path)
    if seed is not None:
        values["seed"] = seed
    try:
        return TrainConfig.from_dict(values)
    except TypeError as exc:
        raise ValueError(f"bad training config{f' in {toml_path}' if toml_path else ''}: {exc}") from None
