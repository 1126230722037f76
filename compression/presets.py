"""Named compression configurations, and TOML overrides on top of them.

"default" is the pipeline as PipelineConfig defines it; "tiny" is the smoke run the tests use.
Imports no torch at module level: the command line lists the preset names.
"""

from __future__ import annotations

from pathlib import Path

from slimrec.models.presets import merge, merge_toml

COMPRESS_PRESETS: dict[str, dict] = {
    "default": {},
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


def compress_config(preset: str, toml_path: Path | None = None):
    """The compression preset, overridden by a TOML file's sections; unknown keys are errors."""
    from slimrec.compression.pipeline_config import PipelineConfig  # torch: only `slimrec compress` pays

    if preset not in COMPRESS_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(COMPRESS_PRESETS)}")
    return PipelineConfig.from_dict(
        merge_toml(merge(PipelineConfig().to_dict(), COMPRESS_PRESETS[preset]), toml_path)
    )
