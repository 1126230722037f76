"""The shared epoch loop of every training stage (teacher, student, fine-tuning), with its checkpoints.

`run_epochs` times each part of an epoch (batches drawn and inputs built, forward/backward
and the optimizer step, validation, the checkpoint write) and, given a `StageCheckpoint`,
saves the state after each epoch and resumes from it: same weights as an uninterrupted run.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from slimrec.models.checkpoint import (
    EpochState,
    StageCheckpoint,
    load_optimizer_tensors,
    numpy_state,
    optimizer_tensors,
    restore_numpy_state,
)
from slimrec.models.device import to_device, training_device
from slimrec.models.distributed import broadcast_score, data_parallel, is_main
from slimrec.models.stage_times import StageTimes
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

DATA, STEP, VALID, CHECKPOINT = "data", "forward_backward", "validation", "checkpoint"


@dataclass
class StageSchedule:
    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 0.0
    patience: int = 3  # epochs without a better validation NDCG@10 before stopping
    # Validate and keep an exponential moving average of the weights (updated every step with
    # this decay) instead of the last step's weights; None: the weights as trained.
    ema_decay: float | None = None

    def __post_init__(self):
        if self.max_epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ValueError(f"invalid StageSchedule: {self}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"StageSchedule.ema_decay must be in (0, 1) or None, got {self.ema_decay}")


@dataclass
class StageResult:
    model: torch.nn.Module
    epochs: int  # epochs of the kept state
    history: list[dict]  # per epoch: loss, examples/s, validation metrics when scored
    seconds: float
    times: dict | None = None  # StageTimes.to_dict() over DATA, STEP, VALID, CHECKPOINT


def log(msg: str) -> None:
    """Progress on stderr; under DDP from rank 0 only, which speaks for all."""
    if is_main():
        print(msg, file=sys.stderr, flush=True)


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def timed_batches(batches: Iterable, times: StageTimes) -> Iterable:
    """`batches`, the time spent producing each one counted as DATA."""
    iterator = iter(batches)
    while True:
        with times.stage(DATA):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def moving_average(model: torch.nn.Module, decay: float | None) -> AveragedModel | None:
    """An EMA of `model`'s parameters (torch's AveragedModel), or None without a decay.

    Buffers are not averaged (use_buffers=False): the models' buffers are constants (item rows,
    feature codes, masks), some of them integer, which an average would break.
    """
    if decay is None:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=False)


def run_epochs(
    name: str,
    model: torch.nn.Module,
    schedule: StageSchedule,
    batches: Callable[[], Iterable],
    step: Callable,
    validate: Callable,
    epochs: int | None,
    n_examples: int,
    checkpoint: StageCheckpoint | None = None,
    rng: np.random.Generator | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> StageResult:
    """AdamW over `batches()` each epoch; `step(batch)` returns the loss.

    epochs=None: validate after every epoch, stop after `patience` epochs without a better
    NDCG@10 and restore the best state. A number: train exactly that long, never validate.
    `checkpoint`: saved after every epoch and loaded first (a finished stage is not rerun);
    `rng`, the NumPy generator `batches` draws from, is saved and restored with it.
    `autocast_dtype` (torch.bfloat16): `step` runs under autocast; backward follows its dtypes.
    `schedule.ema_decay`: validation, the kept state and a fixed run's result are the moving
    average of the weights, not the last step's.
    The epochs run on `training_device()` (batches moved there); the model comes back on the CPU.
    Under DDP (`slimrec.models.distributed`) `batches()` yields this process's part of each
    global batch; only rank 0 validates (its score decides for all) and checkpoints.
    """
    device = training_device()
    model.to(device)
    train_step = data_parallel(model, step)
    # fused: one vectorised kernel per step; the default per-tensor loop takes seconds a step
    # over a million-row embedding table (dense gradients), the fused one a tenth of a second.
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay, fused=True
    )
    ema = moving_average(model, schedule.ema_decay)
    evaluated = ema.module if ema is not None else model  # what validation sees and the stage keeps
    fixed = epochs is not None
    total = epochs if fixed else schedule.max_epochs
    times = StageTimes()
    best, best_state, best_epoch, stale, history, spent, first = -1.0, None, 0, 0, [], 0.0, 1
    saved = checkpoint.load() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved.model)
        torch.set_rng_state(saved.torch_rng)
        restore_numpy_state(rng, saved.numpy_rng)
        s = saved.scalars
        times.stages = s["times"]
        if saved.done:
            log(f"{name}: finished in the checkpoint ({s['result_epochs']} epochs), not rerun")
            model.to("cpu").eval()
            return StageResult(model, s["result_epochs"], s["history"], s["seconds"], times.to_dict())
        load_optimizer_tensors(optimizer, saved.optimizer)
        if ema is not None:
            ema.load_state_dict(saved.ema)
        best, best_epoch, stale, history = s["best"], s["best_epoch"], s["stale"], s["history"]
        best_state, first, spent = saved.best_model, saved.epoch + 1, s["seconds"]
        log(f"{name}: resuming after epoch {saved.epoch} from {checkpoint.path if checkpoint else ''}")
    started = time.perf_counter() - spent

    def state(epoch: int, done: bool) -> EpochState:
        result_epochs = epochs if fixed else max(best_epoch, 1)
        return EpochState(
            epoch,
            done,
            {k: v.detach().clone() for k, v in model.state_dict().items()},
            None if done else best_state,
            {} if done else optimizer_tensors(optimizer),
            torch.get_rng_state(),
            numpy_state(rng),
            {k: v.detach().clone() for k, v in ema.state_dict().items()}
            if ema is not None and not done
            else {},
            {
                "best": best,
                "best_epoch": best_epoch,
                "stale": stale,
                "history": history,
                "seconds": time.perf_counter() - started,
                "times": times.stages,
                "result_epochs": result_epochs,
            },
        )

    for epoch in range(first, total + 1):
        if not fixed and stale >= schedule.patience:
            break  # a resumed run whose last checkpointed epoch already decided to stop
        model.train()
        t0, losses = time.perf_counter(), []
        before = {part: row["wall_s"] for part, row in times.stages.items()}
        for batch in tqdm(
            timed_batches(batches(), times),
            desc=f"{name} epoch {epoch}/{total}",
            leave=False,
            file=sys.stderr,
            total=-(-n_examples // schedule.batch_size),
            disable=None if is_main() else True,
        ):
            with times.stage(STEP):
                batch = to_device(batch, device)
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.bfloat16, enabled=bool(autocast_dtype)
                ):
                    loss = train_step(batch)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if ema is not None:
                    ema.update_parameters(model)
                losses.append(loss.item())
        seconds = time.perf_counter() - t0
        row = {"epoch": epoch, "loss": float(np.mean(losses)), "examples_per_s": n_examples / seconds}
        score = float("nan")
        if not fixed:
            with times.stage(VALID):
                if is_main():
                    row["valid"] = validate(evaluated)
                score = broadcast_score(row["valid"]["ndcg@10"] if "valid" in row else None)
        row["seconds"] = {p: round(r["wall_s"] - before.get(p, 0.0), 3) for p, r in times.stages.items()}
        history.append(row)
        log(
            f"{name} epoch {epoch}/{total}  loss {row['loss']:.4f}  {row['examples_per_s']:,.0f} ex/s"
            + (
                f"  valid ndcg@10 {score:.4f} recall@200 {row['valid']['recall@200']:.4f}"
                if "valid" in row
                else ""
            )
            + "  ("
            + ", ".join(f"{part} {s:.1f} s" for part, s in row["seconds"].items())
            + ")"
        )
        if not fixed:
            if score > best:
                best, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(evaluated.state_dict())
            else:
                stale += 1
                if stale >= schedule.patience:
                    log(f"{name}: stopping, best valid ndcg@10 {best:.4f} at epoch {best_epoch}")
        if checkpoint and is_main():
            with times.stage(CHECKPOINT):
                checkpoint.save(state(epoch, done=False))
        if not fixed and stale >= schedule.patience:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    elif ema is not None:  # a fixed run: the average at its end
        model.load_state_dict(ema.module.state_dict())
    model.to("cpu").eval()
    if checkpoint and is_main():
        checkpoint.save(state(total, done=True))
    kept = epochs if fixed else max(best_epoch, 1)
    return StageResult(model, kept, history, time.perf_counter() - started, times.to_dict())
