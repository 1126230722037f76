"""Module surgery shared by the pruning steps: find modules, ask the filter, swap in rebuilt layers.

A rebuilt Linear or Embedding keeps the device, dtype, trainability and train/eval mode of
the layer it replaces, so a pruned model fine-tunes and exports like the original.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

FilterFn = Callable[[nn.Module, str], bool]


def selected(filter_fn: FilterFn | None, module: nn.Module, name: str) -> bool:
    """Whether `module` (named `name`) is to be pruned: always, without a filter."""
    return filter_fn is None or bool(filter_fn(module, name))


def named_modules_of(model: nn.Module, kind: type) -> list[tuple[str, Any]]:
    """(name, module) for every submodule of type `kind`, `model` itself included (name "")."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def join_name(prefix: str, name: str) -> str:
    """The dotted module path of `name` under `prefix` ("" for the root)."""
    return f"{prefix}.{name}" if prefix else name


def replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap `old` for `new` wherever it is a child (shared modules stay shared)."""
    for parent in model.modules():
        for key, child in list(parent.named_children()):
            if child is old:
                setattr(parent, key, new)


def linear_from(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    """A Linear holding `weight` [out, in] and `bias`, set up like `like`."""
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(like.weight.requires_grad)
    return layer.train(like.training)


def embedding_from(weight: torch.Tensor, like: nn.Embedding) -> nn.Embedding:
    """An Embedding holding `weight` [rows, dim], with the options of `like`."""
    table = nn.Embedding(
        weight.shape[0],
        weight.shape[1],
        padding_idx=like.padding_idx,
        max_norm=like.max_norm,
        sparse=like.sparse,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        table.weight.copy_(weight)
    table.requires_grad_(like.weight.requires_grad)
    return table.train(like.training)
