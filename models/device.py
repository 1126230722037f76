"""Where training runs: `--device auto|cpu|cuda`, chosen once per process, as torch's threads are.

The device is how a run is executed, not what it trains: it is not part of `TrainConfig`
(a compression of a GPU-trained teacher on a CPU machine reads the teacher's config), and
the manifest records it beside the config. Models live on the CPU outside the epoch loop
(export, ONNX, NumPy evaluation); `run_epochs` moves them to the device and back.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")

_selected = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """ "auto": CUDA when torch sees a GPU, else the CPU; "cuda" without one is an error naming it."""
    if name not in DEVICE_CHOICES:
        raise ValueError(f"--device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__} built for CUDA {torch.version.cuda or 'none: a CPU-only build'}); "
            "use --device cpu or auto"
        )
    return torch.device(name)


def select_device(name: str) -> torch.device:
    """Resolve `name` and make it this process's training device."""
    global _selected
    _selected = resolve_device(name)
    return _selected


def training_device() -> torch.device:
    return _selected


def describe(device: torch.device) -> dict:
    """What the manifest records: the device type, and the GPU's name where there is one."""
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    return {"type": device.type}


def to_device(batch, device: torch.device):
    """`batch` (tensors, or dicts/tuples/lists of them) with every tensor on `device`."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (the CPU for a module without any)."""
    return next(module.parameters(), torch.empty(0)).device
