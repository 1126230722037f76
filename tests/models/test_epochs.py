"""models/epochs.py: the moving average of the weights (StageSchedule.ema_decay) is what a stage
validates and keeps."""

from __future__ import annotations

import copy

import pytest
import torch
from slimrec.models.epochs import StageSchedule, run_epochs

DECAY = 0.5


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator)) for _ in range(4)
    ]


def squared_error(model: torch.nn.Module):
    return lambda batch: ((model(batch[0]) - batch[1]) ** 2).mean()


def by_hand(model: torch.nn.Module, schedule: StageSchedule, epochs: int) -> tuple[dict, dict]:
    """The last weights and their moving average, trained and averaged step by step here."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    average = None
    for _ in range(epochs):
        for batch in batches():
            loss = squared_error(model)(batch)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            average = (
                weights
                if average is None
                else {k: DECAY * average[k] + (1 - DECAY) * weights[k] for k in weights}
            )
    return model.state_dict(), average


def test_a_fixed_run_keeps_the_moving_average():
    torch.manual_seed(0)
    start = torch.nn.Linear(3, 1)
    schedule = StageSchedule(max_epochs=2, batch_size=8, lr=0.1, ema_decay=DECAY)
    model = copy.deepcopy(start)
    result = run_epochs("ema", model, schedule, batches, squared_error(model), None, epochs=2, n_examples=32)
    last, average = by_hand(copy.deepcopy(start), schedule, epochs=2)
    for name, value in result.model.state_dict().items():
        torch.testing.assert_close(value, average[name])
        assert not torch.allclose(value, last[name])  # the average, not the last step's weights


def test_validation_sees_the_moving_average():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    seen: list[dict] = []

    def validate(evaluated: torch.nn.Module) -> dict:
        seen.append({k: v.detach().clone() for k, v in evaluated.state_dict().items()})
        return {"ndcg@10": float(len(seen)), "recall@200": 0.0}  # each epoch better: all 3 run

    schedule = StageSchedule(max_epochs=3, batch_size=8, lr=0.1, patience=1, ema_decay=DECAY)
    start = copy.deepcopy(model)
    result = run_epochs("ema", model, schedule, batches, squared_error(model), validate, None, n_examples=32)
    _, average = by_hand(start, schedule, epochs=3)
    assert len(seen) == 3 and result.epochs == 3
    for name, value in seen[-1].items():
        torch.testing.assert_close(value, average[name])
        torch.testing.assert_close(result.model.state_dict()[name], average[name])


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5])
def test_ema_decay_outside_0_1_is_refused(decay):
    with pytest.raises(ValueError, match="ema_decay"):
        StageSchedule(max_epochs=1, batch_size=8, lr=0.1, ema_decay=decay)
