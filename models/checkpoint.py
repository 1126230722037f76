"""Per-epoch checkpoints, so an interrupted `slimrec train --resume` ends where an uninterrupted run would.

A run's checkpoints live in one directory (`<out>.checkpoints/` beside the artifact, as
compression's `<out>.stages/` does), one file per training stage: `<stage>.safetensors`
holding the model, the best state so far and the optimizer's moments as plain tensors,
with the rest (epoch, early-stopping counters, history, the NumPy generator's state) as
JSON in the file's metadata. One file written whole and renamed into place, so a crash
leaves the previous epoch's checkpoint or the new one, never a mix; nothing is unpickled.

`run.json` records what the run was (training config, data fingerprints): resuming with
another config or other data is refused rather than silently mixed.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from slimrec.artifact.atomic import atomic_write_bytes

RUN_FILE = "run.json"


@dataclass
class EpochState:
    """Everything `run_epochs` needs to continue after `epoch` (or, `done`, to skip the stage)."""

    epoch: int
    done: bool
    model: dict[str, torch.Tensor]  # the current state; when done, the kept (best) one
    best_model: dict[str, torch.Tensor] | None
    optimizer: dict[str, torch.Tensor]  # "<param index>.<key>" -> tensor (AdamW's step and moments)
    torch_rng: torch.Tensor
    numpy_rng: dict | None
    ema: dict[str, torch.Tensor]  # the moving average's state (AveragedModel); {} without one, or done
    scalars: dict[str, Any]  # best, best_epoch, stale, history, seconds, times, result_epochs


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat named tensors (hyper-parameters come from config)."""
    return {
        f"{index}.{key}": value.detach().clone()
        for index, slots in optimizer.state_dict()["state"].items()
        for key, value in slots.items()
    }


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


class StageCheckpoint:
    """The checkpoint file of one training stage (e.g. "train-retrieval")."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, state: EpochState) -> None:
        tensors = {f"model.{k}": v for k, v in state.model.items()}
        tensors |= {f"best.{k}": v for k, v in (state.best_model or {}).items()}
        tensors |= {f"optimizer.{k}": v for k, v in state.optimizer.items()}
        tensors |= {f"ema.{k}": v for k, v in state.ema.items()}
        tensors["rng.torch"] = state.torch_rng
        meta = {
            "epoch": state.epoch,
            "done": state.done,
            "has_best": state.best_model is not None,
            "numpy_rng": state.numpy_rng,
            "scalars": state.scalars,
        }
        # Own copies: buffers shared between modules (item_rows) would make safetensors refuse.
        contiguous = {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self.path, save(contiguous, metadata={"state": json.dumps(meta)}))

    def load(self) -> EpochState | None:
        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["state"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
        except (OSError, KeyError, ValueError, SafetensorError) as exc:
            raise ValueError(f"{self.path}: unreadable checkpoint ({exc}); delete it to start over") from None

        def part(prefix: str) -> dict[str, torch.Tensor]:
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

        return EpochState(
            epoch=meta["epoch"],
            done=meta["done"],
            model=part("model."),
            best_model=part("best.") if meta["has_best"] else None,
            optimizer=part("optimizer."),
            torch_rng=tensors["rng.torch"],
            numpy_rng=meta["numpy_rng"],
            ema=part("ema."),
            scalars=meta["scalars"],
        )


class Checkpoints:
    """One run's checkpoint directory.

    Args:
        directory: where the stage files go (created).
        identity: what the run is (config, data fingerprints), JSON-serialisable.
        resume: keep and continue from the files there (refused if `identity` differs);
            False starts over, removing any left by an earlier run.
    """

    def __init__(self, directory: Path, identity: dict, resume: bool):
        self.directory = Path(directory)
        run_file = self.directory / RUN_FILE
        if resume and run_file.exists():
            recorded = json.loads(run_file.read_text())
            if recorded != json.loads(json.dumps(identity)):
                raise ValueError(
                    f"{run_file}: these checkpoints belong to another config or other data; "
                    f"drop --resume to start over, or resume with the same arguments"
                )
        elif self.directory.exists():
            shutil.rmtree(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_file, json.dumps(identity, indent=1, sort_keys=True).encode())

    def stage(self, name: str) -> StageCheckpoint:
        return StageCheckpoint(self.directory / f"{name}.safetensors")

    def remove(self) -> None:
        """Delete the directory once the run's artifact is committed: nothing left to resume."""
        shutil.rmtree(self.directory, ignore_errors=True)


def numpy_state(rng: np.random.Generator | None) -> dict | None:
    return None if rng is None else rng.bit_generator.state


def restore_numpy_state(rng: np.random.Generator | None, state: dict | None) -> None:
    if rng is not None and state is not None:
        rng.bit_generator.state = state
