"""compression/presets.py: every preset builds a valid PipelineConfig; "averaged" changes what it says."""

from __future__ import annotations

import pytest
from slimrec.compression.presets import COMPRESS_PRESETS, compress_config


@pytest.mark.parametrize("preset", sorted(COMPRESS_PRESETS))
def test_every_preset_builds_a_config_that_round_trips(preset):
    config = compress_config(preset)
    assert type(config).from_dict(config.to_dict()).to_dict() == config.to_dict()


def test_averaged_averages_the_student_and_its_fine_tune_and_prunes_less():
    default, averaged = compress_config("default"), compress_config("averaged")
    for schedule in (averaged.distill.retrieval_schedule, averaged.finetune):
        assert schedule.ema_decay == 0.99
    assert default.distill.retrieval_schedule.ema_decay is None and default.finetune.ema_decay is None
    assert averaged.prune.keep_fraction > default.prune.keep_fraction
    assert averaged.distill.student_two_tower == default.distill.student_two_tower  # same student size


def test_unknown_preset_names_itself():
    with pytest.raises(ValueError, match="'nope'"):
        compress_config("nope")


@pytest.mark.parametrize(
    ("teacher", "preset"),
    [
        ("teacher", "default"),
        ("teacher-sequence", "default"),
        ("teacher-averaged", "averaged"),
        ("teacher-averaged-large", "averaged-large"),
    ],
)
def test_compress_follows_a_weight_averaged_teacher_with_an_averaged_preset(teacher, preset):
    from slimrec.compression.presets import preset_for_teacher
    from slimrec.models.presets import train_config

    assert preset_for_teacher(train_config(teacher).to_dict(), teacher) == preset


def test_a_weight_averaged_teacher_of_an_unnamed_preset_gets_the_averaged_preset():
    from slimrec.compression.presets import preset_for_teacher
    from slimrec.models.presets import train_config

    # An artifact written before its config recorded the preset, or trained from a TOML file.
    assert preset_for_teacher(train_config("teacher-averaged-large").to_dict(), None) == "averaged"
