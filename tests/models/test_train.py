"""models/train.py: training schedules are checked at construction."""

from __future__ import annotations

import pytest
from slimrec.models.train import StageSchedule


@pytest.mark.parametrize("changes", [{"max_epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"patience": 0}])
def test_stage_schedule_rejects(changes):
    with pytest.raises(ValueError, match="invalid StageSchedule"):
        StageSchedule(**{"max_epochs": 1, "batch_size": 8, "lr": 1e-3, **changes})
