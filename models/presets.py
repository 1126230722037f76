"""Named training configurations, and TOML overrides on top of them.

"teacher" is the full model with the pooled history; "teacher-sequence" the same two-stage
teacher whose user tower reads the history with causal self-attention (SASRec) and trains
with a full softmax; "teacher-averaged" validates a moving average of the weights, and
"teacher-averaged-large" adds a faster-learning ranker for data the size of ML-1M.
`default_preset` names the one validation chose for a dataset (see `TEACHER_BY_DATASET`).
"tiny" is the smoke run the tests use (seconds on ml-100k).
Imports no torch at module level: `slimrec serve`'s parser lists the preset names.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

TRAIN_PRESETS: dict[str, dict] = {
    # tau 0.1 over 0.05: higher validation recall@200 at every epoch (0.749 vs 0.743 at the kept
    # epoch), the ceiling of the two-stage system; validation NDCG@10 within one standard error.
    # Decoupled weight decay 4 on the two-tower: without it the big id tables overfit by epoch 5.
    # Retrieval alone at the earlier size (below), kept epoch, validation NDCG@10 / recall@200 over
    # weight decay 0, 0.5, 1, 2, 4:
    # 0.168/0.748, 0.178/0.747, 0.179/0.752, 0.186/0.757, 0.193/0.763 (seed 0; larger not tried).
    #
    # Sized for issue 13's bar (ml-100k end to end in <= 120 s on 2 cores; it took ~680 s with
    # id_dim 128, towers (1024, 512) / (512, 256), history 50, the default ranker, fp32). The
    # validation plateau is the same at a fraction of the cost; selection-fold figures, seed 0,
    # one thread (CPU s of that fold), valid NDCG@10 retrieval / two-stage:
    #   id_dim 64, out_dim 64, towers (256,) / (256,), student-sized ranker: 103 s, 0.190 / 0.202;
    #   history_len 20 as well: retrieval 43 s (10 epochs) instead of ~60, 0.196, recall@200 0.774;
    #   bf16 as well: retrieval 24 s (8 epochs, patience 2), 0.196, recall@200 0.765. bf16 vs fp32
    #   over seeds 0-2, two-stage: 0.198 vs 0.199 mean (fp32 costs ~1.4x): bf16 kept.
    # Retrieval alone at this size (seed 0): weight decay 2 / 4 / 8: 0.193 / 0.196 / 0.183;
    # lr 1e-3 (wd 4 or 8) or batch 2048: no higher plateau (0.185-0.193), more epochs;
    # logq_weight 0.5 / 0: 0.167 / 0.087. id_dim 128 at history 20: 0.184.
    # Ranker over one retrieval model (seed 1), valid two-stage NDCG@10: the student size
    # (id 32, 2 low-rank crosses, deep (256, 64)) 0.1934 at 10 CPU s; (512, 128) 0.1935 at 40 s;
    # the default (1024, 512, 256) 0.1936 at 106 s: size buys nothing. More lists per epoch
    # (cut_points 8, hard_negatives 50): 0.1971 at 32 s, still rising at epoch 5: kept.
    # lr 3e-3 with 5 epochs: 0.2046 vs 0.2038 for lr 1e-3 over 8 (seed 0).
    # `slimrec train --data ml-100k --threads 1`, seeds 0/1/2: valid two-stage 0.204 / 0.197 /
    # 0.196, test two-stage 0.167 / 0.162 / 0.154 (mean 0.161; the old teacher: 0.160, seed 0),
    # test recall@200 0.715 / 0.715 / 0.724; 92-127 CPU s in all (export 8-9 s, evaluate ~9 s).
    # Default threads (2), seed 0: valid two-stage 0.204, test 0.160 (thread count changes the
    # sums, so the figures). Epochs on 2 idle cores: retrieval ~2.4 s, ranker ~4.5 s with its
    # validation; summed with export (10-12 s) and evaluate (5 s), ~95 s end to end. A competing
    # process on the 2 cores slowed some 2-thread epochs 10-25x (46-67 s), not 2x.
    # ema_decay (validate and keep a moving average of the weights, every step): without it the
    # retrieval's validation NDCG@10 jumps between epochs (0.177, 0.199, 0.177 at epochs 5-7,
    # seed 0) and the kept epoch is a spike. `slimrec train --data ml-100k --seed 0/1/2`, default
    # threads, 2-vCPU, 48-68 s each; valid two-stage / test two-stage NDCG@10, means of 3 seeds:
    #   no average: 0.1995 / 0.1608; retrieval 0.99: 0.2153 / 0.1825; retrieval 0.995: 0.2162 /
    #   0.1852; retrieval and ranker 0.99: 0.2167 / 0.1829 (highest on validation).
    # Not the default: the student does not follow. `slimrec compress` of the averaged teacher
    # (seed 0): test 0.1623 vs the teacher's 0.1839 (0.88x), its retrieval still rising at its
    # 4th and last epoch. With the "averaged" compression preset (longer averaged student and
    # fine-tune, 3/4 of the units kept) the student reaches 0.178 (0.971x, 3 seeds: below issue
    # 13's 0.98x; the gate fails on validation), yet above this preset's own teacher (~0.161):
    # "teacher-averaged" + compress preset "averaged" is the pair to use for the best served model.
    # ranker new_user_dropout 0.2: the ranker reads the user's side features, whose "unknown" rows
    # no training list reached, so users known by their history alone were ranked through
    # untrained rows. `slimrec quality --data ml-100k` (seeds 0-2, test two-stage NDCG@10), before
    # / after: teacher 0.1608 / 0.1606, its new users 0.940x / 0.961x the known; compressed 0.1595
    # / 0.1601, its new users 0.978x / 0.980x; compressed vs teacher, paired, -0.0012 / -0.0005.
    "teacher": {
        "history_len": 20,
        "precision": "bf16",
        "two_tower": {
            "temperature": 0.1,
            "id_dim": 64,
            "out_dim": 64,
            "user_hidden": [256],
            "item_hidden": [256],
        },
        "retrieval_schedule": {"weight_decay": 4.0, "patience": 2},
        "ranker": {
            "id_dim": 32,
            "feature_dim": 8,
            "n_cross": 2,
            "cross_rank": 32,
            "deep": [256, 64],
            "new_user_dropout": 0.2,
        },
        "ranker_schedule": {"lr": 3e-3, "max_epochs": 5},
        "ranker_data": {"cut_points": 8, "hard_negatives": 50},
    },
    # One row per window of history_len items per user, each position predicting the next
    # (SASRec), over the whole catalogue ("auto": full softmax up to 20,000 items). Rows are
    # ~1/40 as many as the pooled teacher's, so smaller batches keep the steps per epoch up.
    # The user MLP narrows to (256,): it runs at every position; (1024, 512) cost ~2x a step.
    # ML-1M, one thread, seed 0 (`--config` with these values, issue 13): bf16 and batch 128 at
    # lr 3e-3 take ~110-130 CPU s an epoch (fp32 batch 64: ~165 s); retrieval valid NDCG@10 by
    # epoch 0.094 0.132 0.159 0.178 0.198 0.213 0.213 0.225 0.227 0.234 (kept: 10, stopped at 12),
    # two-stage 0.2435 with the student-sized ranker of "teacher" (the default ranker cost 156 CPU
    # s an epoch and 417 s of evaluation on ML-1M). Test two-stage 0.2227 (retrieval alone 0.2102,
    # history only 0.1986); 3,775 s of training on a loaded machine. Peak RSS 13.2 GiB then, in
    # the ranker's list building (all 48k lists through the user tower at once); embedded in
    # chunks since, that step peaks at 1.5 GiB (the whole run not re-measured).
    "teacher-sequence": {
        "precision": "bf16",
        "two_tower": {
            "temperature": 0.1,
            "history_encoder": "attention",
            "loss": "auto",
            "user_hidden": [256],
        },
        "retrieval_schedule": {
            "batch_size": 128,
            "lr": 3e-3,
            "weight_decay": 0.5,
            "max_epochs": 14,
            "patience": 2,
        },
        "ranker": {"id_dim": 32, "feature_dim": 8, "n_cross": 2, "cross_rank": 32, "deep": [256, 64]},
        "ranker_schedule": {"lr": 3e-3, "max_epochs": 4},
        "ranker_data": {"cut_points": 8, "hard_negatives": 50},
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
# (the pooled teacher's test: 0.164). Pooled figures from before issue 13's resize; the resized
# pooled teacher: 0.196 (two-stage 0.204, test 0.167).
# ml-1m, valid two-stage NDCG@10 (seed 0): "teacher-averaged-large" 0.2462 (9.7 min of training;
# test 0.2284); "teacher-sequence" 0.2435 (~63 min, see its comment; test 0.2227);
# "teacher-averaged" 0.2385 (6 min; retrieval alone 0.2278), 0.2416 with 10 ranker epochs at 3e-3
# (12.8 min, still rising ~0.0005 an epoch). Retrieval alone of "teacher-averaged" with
# history_len 50: 0.2288; with a full softmax: 0.2263 at twice the cost per epoch.
TEACHER_BY_DATASET = {"ml-100k": "teacher", "ml-1m": "teacher-averaged-large"}


def default_preset(data: str | Path) -> str:
    """The teacher preset chosen on validation for `data` (a dataset name or directory), else "teacher".

    Example:
        >>> default_preset("../shared/data/ml-1m"), default_preset("my-shop")
        ('teacher-averaged-large', 'teacher')
    """
    return TEACHER_BY_DATASET.get(Path(data).name, "teacher")


def merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s values; nested tables merge key by key instead of replacing."""
    out = dict(base)
    for key, value in override.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merge(out[key], value) if nested else value
    return out


# "teacher" with both stages weight-averaged (figures in "teacher"'s comment); pair it with the
# "averaged" compression preset.
TRAIN_PRESETS["teacher-averaged"] = merge(
    TRAIN_PRESETS["teacher"],
    {"retrieval_schedule": {"ema_decay": 0.99}, "ranker_schedule": {"ema_decay": 0.99}},
)
# "teacher-averaged" whose ranker learns at 1e-2: at 3e-3 its ML-1M ranker was still rising at
# epoch 10 (valid two-stage 0.2416); at 1e-2, epochs 1-6 read 0.2335 0.2364 0.2405 0.2437 0.2444
# 0.2462 (seed 0, twice), above "teacher-sequence"'s 0.2435 (whose ranker, at 3e-3, was not
# re-tuned: an hour a run) at a sixth of its training time. Not measured on ml-100k, whose
# figures use "teacher".
TRAIN_PRESETS["teacher-averaged-large"] = merge(
    TRAIN_PRESETS["teacher-averaged"],
    {"ranker_schedule": {"lr": 1e-2, "max_epochs": 6, "patience": 2}},
)


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
