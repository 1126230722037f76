"""Training on several processes or machines: PyTorch's DistributedDataParallel under torchrun.

`slimrec train --nproc N` starts torchrun, which starts N copies of the same command with
RANK / WORLD_SIZE / MASTER_ADDR in their environment; each copy joins the process group
(`init_from_env`: gloo on the CPU, NCCL on GPUs) and trains the same model on its slice of
every global batch (`local_slice`). What makes N processes train like one:

- every process draws the same global batches (same seed, same NumPy generator) and keeps
  its contiguous slice, so the global batch is the one a single process would take;
- each loss is a mean over the global batch (`global_mean`): DDP averages gradients over
  processes, so a process's loss is scaled by its share of the batch;
- in-batch negatives come from the whole global batch (`gather_rows`, a differentiable
  all-gather), so the softmax has the same columns on 1 or N processes; the logQ
  correction reads counts over all fitted rows, which every process computes alike;
- only rank 0 validates (the score is broadcast, so all stop at the same epoch), writes
  checkpoints and the artifact.

One process without torchrun is a world of one: every function here is then the identity.
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from slimrec.models.device import module_device

LAUNCHED_BY_TORCHRUN = "TORCHELASTIC_RUN_ID"  # set by torchrun in every process it starts


def launched_by_torchrun() -> bool:
    return LAUNCHED_BY_TORCHRUN in os.environ


def init_from_env(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the process group torchrun's environment describes (a world of one: nothing to do)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """Whether this process validates, logs, checkpoints and writes (rank 0, or the only one)."""
    return rank() == 0


def local_slice(n: int) -> slice:
    """This process's contiguous part of a global batch of n rows (sizes differ by at most one).

    Example (rank 1 of 2):  local_slice(5) == slice(2, 5)
    """
    size, r = world_size(), rank()
    return slice(r * n // size, (r + 1) * n // size)


def global_mean(local_mean: torch.Tensor, local_count: int) -> torch.Tensor:
    """`local_mean` (over this process's `local_count` terms), scaled so that DDP's average of
    gradients over processes is the gradient of the mean over the whole global batch."""
    size = world_size()
    if size == 1:
        return local_mean
    total = torch.tensor([float(local_count)], device=local_mean.device)
    dist.all_reduce(total)
    if local_count == 0:
        return torch.nan_to_num(local_mean) * 0.0  # the mean of no terms is NaN; it adds nothing
    return local_mean * (local_count * size / total.item())


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows of `x` from every process, in rank order; the offset of this process's rows).

    Differentiable: the gradient of a row flows back to the process that computed it. Slices
    may differ in length by one (`local_slice`), so they are padded for the collective.
    """
    size = world_size()
    if size == 1:
        return x, 0
    counts = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(size)]
    dist.all_gather(counts, torch.tensor([len(x)], device=x.device))
    lengths = [int(c) for c in counts]
    padded = torch.nn.functional.pad(x, (0,) * (2 * x.dim() - 1) + (max(lengths) - len(x),))
    if x.requires_grad:
        parts = dist_nn.all_gather(padded)
    else:
        parts = [torch.empty_like(padded) for _ in range(size)]
        dist.all_gather(parts, padded)
    rows = torch.cat([p[:n] for p, n in zip(parts, lengths, strict=True)])
    return rows, sum(lengths[: rank()])


def broadcast_score(score: float | None) -> float:
    """Rank 0's validation score on every process (NaN where rank 0 had none)."""
    if world_size() == 1:
        return float("nan") if score is None else score
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([float("nan") if score is None else score], dtype=torch.float64, device=device)
    dist.broadcast(value, src=0)
    return float(value.item())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class _LossOf(torch.nn.Module):
    """`step(batch)` as a module's forward: DDP syncs gradients of what its forward computed."""

    def __init__(self, model: torch.nn.Module, step):
        super().__init__()
        self.model, self.step = model, step

    def forward(self, batch):
        return self.step(batch)


def data_parallel(model: torch.nn.Module, step):
    """`step` (batch -> loss of `model`) with gradients averaged over processes by DDP.

    DDP broadcasts rank 0's parameters and buffers when it wraps the model, so every process
    starts from the same weights; buffers (feature tables) never change, so they are not
    re-broadcast each step.
    """
    if world_size() == 1:
        return step
    from torch.nn.parallel import DistributedDataParallel

    device = module_device(model)
    return DistributedDataParallel(
        _LossOf(model, step),
        device_ids=[device] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


def torchrun_command(
    argv: list[str], nproc: int, nnodes: int, node_rank: int, endpoint: str | None
) -> list[str]:
    """The torchrun command that runs `slimrec <argv>` as nproc processes on each of nnodes machines.

    One machine: rendezvous on 127.0.0.1 at a free port. Several: every machine runs the same
    command with its --node-rank and the same --rdzv-endpoint (host:port of any one of them).
    """
    if endpoint is None:
        if nnodes > 1:
            raise ValueError("--nnodes > 1 needs --rdzv-endpoint host:port (the same on every machine)")
        endpoint = f"127.0.0.1:{free_port()}"
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        "--max-restarts=0",
        "-m",
        "slimrec.cli",
        *without_launch_options(argv),
    ]


LAUNCH_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")


def without_launch_options(argv: list[str]) -> list[str]:
    """`argv` less the options that start torchrun: the processes it starts are told by their
    environment, and torchrun's own parser would take `--nproc` for its `--nproc-per-node`.

    Example:
        >>> without_launch_options(["train", "--nproc", "2", "--nnodes=1", "--seed", "3"])
        ['train', '--seed', '3']
    """
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in LAUNCH_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in LAUNCH_OPTIONS)):
            out.append(arg)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
