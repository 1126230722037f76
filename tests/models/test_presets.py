"""models/presets.py: every preset builds a valid config, and the teacher chosen per dataset."""

from __future__ import annotations

import pytest
import torch
from slimrec.models.presets import TEACHER_BY_DATASET, TRAIN_PRESETS, default_preset, train_config
from slimrec.models.two_tower import TwoTower
from tiny_towers import SPACE, TABLES, users


@pytest.mark.parametrize("preset", sorted(TRAIN_PRESETS))
def test_every_preset_builds_a_two_tower_that_embeds_new_users(preset):
    config = train_config(preset)
    torch.manual_seed(0)
    model = TwoTower(config.two_tower, SPACE, TABLES).eval()
    with torch.no_grad():
        u = model.user_tower(**users([0, 1], [[0, 0, 0], [1, 2, 3]]))
    assert torch.isfinite(u).all() and u.shape == (2, config.two_tower.out_dim)


def test_teacher_sequence_is_the_attention_encoder_with_a_full_softmax():
    tower = train_config("teacher-sequence").two_tower
    assert (tower.history_encoder, tower.loss, tower.all_positions) == ("attention", "auto", True)
    assert train_config("teacher").two_tower.history_encoder == "pooled"


@pytest.mark.parametrize(
    ("data", "preset"),
    [
        ("ml-100k", "teacher"),
        ("ml-1m", "teacher-averaged-large"),
        ("../shared/data/ml-1m", "teacher-averaged-large"),  # a directory: its name
        ("../shared/data/ml-1m/", "teacher-averaged-large"),
        ("my-shop", "teacher"),  # not measured: the pooled teacher
    ],
)
def test_default_preset_by_dataset(data, preset):
    assert default_preset(data) == preset


def test_the_chosen_presets_exist():
    assert set(TEACHER_BY_DATASET.values()) <= set(TRAIN_PRESETS)


def test_teacher_averaged_is_the_teacher_with_both_stages_weight_averaged():
    teacher, averaged = train_config("teacher").to_dict(), train_config("teacher-averaged").to_dict()
    for stage in ("retrieval_schedule", "ranker_schedule"):
        assert (teacher[stage]["ema_decay"], averaged[stage]["ema_decay"]) == (None, 0.99)
        averaged[stage]["ema_decay"] = None
    assert averaged == teacher


def test_teacher_averaged_large_changes_only_the_rankers_schedule():
    averaged, large = (
        train_config("teacher-averaged").to_dict(),
        train_config("teacher-averaged-large").to_dict(),
    )
    assert (large["ranker_schedule"]["lr"], large["ranker_schedule"]["max_epochs"]) == (1e-2, 6)
    large["ranker_schedule"] = averaged["ranker_schedule"]
    assert large == averaged
