"""models/checkpoint.py + models/epochs.py: a run interrupted after any epoch and resumed ends with the
same weights, to the bit, as one that was never interrupted; foreign checkpoints are refused."""

from __future__ import annotations

import pytest
import torch
from slimrec.models.checkpoint import Checkpoints, EpochState, StageCheckpoint
from slimrec.models.data import build_dataset
from slimrec.models.epochs import StageSchedule
from slimrec.models.features import build_feature_space
from slimrec.models.fold import FIT_TRAIN, FIT_TRAIN_VALID, Fold
from slimrec.models.ranker import RankerConfig
from slimrec.models.split import protocol_split
from slimrec.models.synth import generate_synthetic
from slimrec.models.train import RankerData, TrainConfig, fit_teacher
from slimrec.models.two_tower import TwoTowerConfig

# Early-stopped stages of 3 epochs at most, so a resume lands before, at and after a stop decision;
# retrieval keeps a moving average of its weights (its state is checkpointed too), the ranker not.
CONFIG = TrainConfig(
    seed=5,
    history_len=5,
    two_tower=TwoTowerConfig(id_dim=8, feature_dim=4, user_hidden=(16,), item_hidden=(16,), out_dim=8),
    ranker=RankerConfig(id_dim=8, feature_dim=4, n_cross=1, deep=(8,)),
    retrieval_schedule=StageSchedule(max_epochs=3, batch_size=64, lr=1e-2, patience=1, ema_decay=0.9),
    ranker_schedule=StageSchedule(max_epochs=2, batch_size=16, lr=1e-2, patience=1),
    ranker_data=RankerData(
        cut_points=2, max_positives=3, hard_negatives=5, random_negatives=3, candidates=20
    ),
    retrieval_weights=(0.0, 1.0),
)


class Interrupted(Exception):
    pass


class InterruptingCheckpoint(StageCheckpoint):
    """Saves as usual, then raises once the run has saved `budget[0]` checkpoints (a kill at that point)."""

    def __init__(self, path, budget: list[int]):
        super().__init__(path)
        self.budget = budget

    def save(self, state: EpochState) -> None:
        super().save(state)
        self.budget[0] -= 1
        if self.budget[0] == 0:
            raise Interrupted(f"after {self.path.name} epoch {state.epoch}")


class InterruptingCheckpoints(Checkpoints):
    def __init__(self, directory, identity, resume, after_saves: int):
        super().__init__(directory, identity, resume)
        self.budget = [after_saves]

    def stage(self, name: str) -> StageCheckpoint:
        return InterruptingCheckpoint(self.directory / f"{name}.safetensors", self.budget)


@pytest.fixture(scope="module")
def folds():
    dataset = build_dataset("synth", *generate_synthetic(n_items=60, n_users=40, n_interactions=600, seed=0))
    split, space = protocol_split(dataset), build_feature_space(dataset, CONFIG.history_len)
    return Fold.create(FIT_TRAIN, dataset, split, space), Fold.create(FIT_TRAIN_VALID, dataset, split, space)


@pytest.fixture(scope="module")
def uninterrupted(folds, tmp_path_factory):
    return fit_teacher(*folds, CONFIG, Checkpoints(tmp_path_factory.mktemp("ck"), {"run": 1}, resume=False))


def states(fitted) -> dict[str, torch.Tensor]:
    return {
        f"{i}.{name}.{k}": v
        for i, models in enumerate(fitted)
        for name, module in (("two_tower", models.two_tower), ("ranker", models.ranker))
        for k, v in module.state_dict().items()
    }


def test_checkpoints_do_not_change_training(folds, uninterrupted):
    plain = fit_teacher(*folds, CONFIG)
    expected = states(uninterrupted)
    assert all(torch.equal(v, expected[k]) for k, v in states(plain).items())


# Saves run per epoch and once per finished stage: 1 = first retrieval epoch; 3 = inside the first
# ranker stage; the later ones fall in the final fold's stages.
@pytest.mark.parametrize("after_saves", [1, 2, 3, 5, 7])
def test_interrupted_then_resumed_equals_uninterrupted(folds, uninterrupted, tmp_path, after_saves):
    with pytest.raises(Interrupted):
        fit_teacher(*folds, CONFIG, InterruptingCheckpoints(tmp_path, {"run": 1}, False, after_saves))
    resumed = fit_teacher(*folds, CONFIG, Checkpoints(tmp_path, {"run": 1}, resume=True))
    expected = states(uninterrupted)
    got = states(resumed)
    assert list(got) == list(expected)
    for name, value in got.items():
        assert torch.equal(value, expected[name]), name
    for mine, theirs in zip(resumed, uninterrupted, strict=True):
        assert mine.retrieval_weight == theirs.retrieval_weight
        assert mine.retrieval.epochs == theirs.retrieval.epochs
        assert mine.ranking.epochs == theirs.ranking.epochs
        assert [r.get("loss") for r in mine.retrieval.history] == [
            r.get("loss") for r in theirs.retrieval.history
        ]


def test_resume_refuses_checkpoints_of_another_run(tmp_path):
    Checkpoints(tmp_path, {"train": {"seed": 0}}, resume=False)
    with pytest.raises(ValueError, match="another config or other data"):
        Checkpoints(tmp_path, {"train": {"seed": 1}}, resume=True)


def test_starting_over_removes_old_checkpoints(tmp_path):
    (tmp_path / "train-retrieval.safetensors").write_bytes(b"old")
    Checkpoints(tmp_path, {"run": 2}, resume=False)
    assert not (tmp_path / "train-retrieval.safetensors").exists()


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "train-retrieval.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="train-retrieval.safetensors: unreadable checkpoint"):
        StageCheckpoint(path).load()
