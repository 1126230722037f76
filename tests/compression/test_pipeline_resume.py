"""compression/pipeline.py run_stages: distil, prune + fine-tune, quantize, interrupted after an epoch and
resumed, ends with the weights of an uninterrupted run (the student is built before its stage seeds,
so a finished stage must hand on the RNG state it ended with); and a fold's models do not depend on
the RNG state run_stages is entered with (the final fold follows a selection fold of any length)."""

from __future__ import annotations

import pytest
import torch
from slimrec.compression.pipeline import run_stages
from slimrec.compression.presets import compress_config
from slimrec.models.checkpoint import Checkpoints, EpochState, StageCheckpoint
from slimrec.models.data import build_dataset
from slimrec.models.epochs import StageSchedule
from slimrec.models.features import build_feature_space
from slimrec.models.fold import FIT_TRAIN, Fold
from slimrec.models.ranker import Ranker, RankerConfig
from slimrec.models.split import protocol_split
from slimrec.models.synth import generate_synthetic
from slimrec.models.train import RankerData, TrainConfig
from slimrec.models.two_tower import TwoTower, TwoTowerConfig

TRAIN = TrainConfig(
    seed=2,
    history_len=5,
    two_tower=TwoTowerConfig(id_dim=8, feature_dim=4, user_hidden=(16,), item_hidden=(16,), out_dim=8),
    ranker=RankerConfig(id_dim=8, feature_dim=4, n_cross=1, deep=(8,)),
    ranker_data=RankerData(
        cut_points=2, max_positives=3, hard_negatives=5, random_negatives=3, candidates=20
    ),
    retrieval_weights=(0.0, 1.0),
)


class Interrupted(Exception):
    pass


class Interrupting(Checkpoints):
    """Checkpoints that raise once `after` of them have been saved (a kill at that point)."""

    def __init__(self, directory, after: int):
        super().__init__(directory, {"run": 1}, resume=False)
        self.left = after

    def stage(self, name: str) -> StageCheckpoint:
        outer = self

        class Once(StageCheckpoint):
            def save(self, state: EpochState) -> None:
                super().save(state)
                outer.left -= 1
                if outer.left == 0:
                    raise Interrupted(name)

        return Once(self.directory / f"{name}.safetensors")


@pytest.fixture(scope="module")
def setup():
    dataset = build_dataset("synth", *generate_synthetic(n_items=60, n_users=40, n_interactions=600, seed=0))
    fold = Fold.create(FIT_TRAIN, dataset, protocol_split(dataset), build_feature_space(dataset, 5))
    torch.manual_seed(0)
    teacher = (
        TwoTower(TRAIN.two_tower, fold.space, fold.tables),
        Ranker(TRAIN.ranker, fold.space, fold.tables),
    )
    config = compress_config("tiny", None)
    two_epochs = StageSchedule(max_epochs=2, batch_size=64, lr=5e-3, patience=2)
    config.distill.retrieval_schedule = config.finetune = two_epochs
    return fold, teacher, config


def weights(stages) -> dict[str, torch.Tensor]:
    return {
        f"{stage}.{part}.{k}": v
        for stage, models in stages.items()
        for part, module in (("two_tower", models.two_tower), ("ranker", models.ranker))
        for k, v in module.state_dict().items()
    }


def run(setup, checkpoints):
    fold, teacher, config = setup
    return run_stages(fold, teacher, TRAIN, config, None, checkpoints=checkpoints)


@pytest.fixture(scope="module")
def uninterrupted(setup):
    return weights(run(setup, None))


# Saves: student retrieval epochs 1, 2 + done (3), student ranker 4 + done (5); fine-tuning from 6.
@pytest.mark.parametrize("after", [1, 3, 4, 7])
def test_resumed_stages_equal_uninterrupted(setup, uninterrupted, tmp_path, after):
    expected = uninterrupted
    with pytest.raises(Interrupted):
        run(setup, Interrupting(tmp_path, after))
    got = weights(run(setup, Checkpoints(tmp_path, {"run": 1}, resume=True)))
    assert list(got) == list(expected)
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name


def test_stages_do_not_depend_on_the_rng_state_they_start_from(setup, uninterrupted):
    fold, teacher, config = setup
    torch.rand(1000)  # as if a selection fold had run more epochs first
    got = weights(run_stages(fold, teacher, TRAIN, config, None))
    for name, value in uninterrupted.items():
        assert torch.equal(got[name], value), name
