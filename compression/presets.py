"""Named compression configurations, and TOML overrides on top of them.

"default" is the pipeline as PipelineConfig defines it; "averaged" follows a weight-averaged teacher;
"tiny" is the smoke run the tests use.
Imports no torch at module level: the command line lists the preset names.
"""

from __future__ import annotations

from pathlib import Path

from slimrec.models.presets import merge, merge_toml

COMPRESS_PRESETS: dict[str, dict] = {
    "default": {},
    # For a weight-averaged teacher (train preset "teacher-averaged"), which the default's 4-epoch
    # student follows to 0.88x only (ml-100k, seed 0). The student and its fine-tune averaged too,
    # longer and at a higher lr; 3/4 of the hidden units kept (1/2 cost 0.004-0.011 test NDCG@10
    # that fine-tuning did not win back). ml-100k, seeds 0-2, 85-105 s wall on 2 cores, test
    # two-stage NDCG@10 (`slimrec quality --preset teacher-averaged --compress-preset averaged`,
    # 2026-12-05): teacher 0.1832, compressed 0.1778 (0.971x; paired per-user difference -0.0054
    # [-0.0094, -0.0014], "loses"); the default pair's compressed model: 0.1601.
    "averaged": {
        "distill": {
            "retrieval_schedule": {
                "max_epochs": 8,
                "batch_size": 256,
                "lr": 5e-3,
                "patience": 2,
                "ema_decay": 0.99,
            }
        },
        "prune": {"keep_fraction": 0.75},
        "finetune": {"max_epochs": 4, "batch_size": 256, "lr": 3e-3, "patience": 1, "ema_decay": 0.99},
    },
    "tiny": {
        "distill": {
            "student_two_tower": {
                "id_dim": 8,
                "feature_dim": 4,
                "user_hidden": [16],
                "item_hidden": [16],
                "out_dim": 8,
            },
            "student_ranker": {"id_dim": 8, "feature_dim": 4, "n_cross": 1, "cross_rank": 4, "deep": [16, 8]},
            "retrieval_schedule": {"max_epochs": 1, "batch_size": 1024, "lr": 5e-3, "patience": 1},
            "ranker_schedule": {"max_epochs": 1, "batch_size": 128, "lr": 2e-3, "patience": 1},
        },
        "prune": {"min_units": 2},
        "finetune": {"max_epochs": 1, "batch_size": 1024, "lr": 1e-3, "patience": 1},
        "finetune_ranker": {"max_epochs": 1, "batch_size": 128, "lr": 1e-3, "patience": 1},
        "index": {"nprobe_grid": [1, 4, 16]},
    },
}

# "averaged" for "teacher-averaged-large" on data the size of ML-1M: batch 1024 (lr doubled, by
# the square-root rule for a batch four times larger) and fewer epochs, to fit training and
# compression in 30 min on 2 cores. ML-1M, seed 0: at 8 student + 4 fine-tune epochs compression
# took 26 min (student epochs ~45 s on train, ~60 s on train + valid; valid retrieval NDCG@10 by
# epoch 0.2117 0.2338 0.2381 0.2398 0.2431 0.2441 0.2453 0.2485, fine-tuned 0.2459 0.2469 0.2474
# 0.2484), test two-stage 0.2411 against the teacher's 0.2284 (1.056x), promotable. At 5 + 2:
# 1,040 s (train 634 s before it: 27.9 min), test 0.2378 (1.041x), promotable.
COMPRESS_PRESETS["averaged-large"] = merge(
    COMPRESS_PRESETS["averaged"],
    {
        "distill": {"retrieval_schedule": {"max_epochs": 5, "batch_size": 1024, "lr": 1e-2}},
        "finetune": {"max_epochs": 2, "batch_size": 1024, "lr": 6e-3},
    },
)


# A teacher preset whose students want their own compression preset, by the teacher's preset name.
PRESET_BY_TEACHER = {"teacher-averaged-large": "averaged-large"}


def preset_for_teacher(train: dict, teacher_preset: str | None = None) -> str:
    """The preset `slimrec compress` takes for a teacher trained with `train` (TrainConfig.to_dict)
    under the train preset `teacher_preset` (the artifact's config records it): its own entry in
    PRESET_BY_TEACHER, else "averaged" where its retrieval stage kept a weight average (the
    default's student follows one to 0.88x only), else "default"."""
    if teacher_preset in PRESET_BY_TEACHER:
        return PRESET_BY_TEACHER[teacher_preset]
    return "averaged" if train["retrieval_schedule"].get("ema_decay") else "default"


def compress_config(preset: str, toml_path: Path | None = None):
    """The compression preset, overridden by a TOML file's sections; unknown keys are errors."""
    from slimrec.compression.pipeline_config import PipelineConfig  # torch: only `slimrec compress` pays

    if preset not in COMPRESS_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(COMPRESS_PRESETS)}")
    return PipelineConfig.from_dict(
        merge_toml(merge(PipelineConfig().to_dict(), COMPRESS_PRESETS[preset]), toml_path)
    )
