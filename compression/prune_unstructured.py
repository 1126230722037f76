"""Unstructured magnitude pruning: zeros only, with masks to keep them through fine-tuning.

Dense kernels do the same work on zeros, so it buys nothing at inference;
`sparse_storage_bytes` says what it would save on disk in a sparse format.
"""

from __future__ import annotations

import torch
from slimrec.compression.module_surgery import FilterFn, named_modules_of, selected
from torch import nn


def magnitude_prune_(model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None) -> nn.Module:
    """Zero the `sparsity` fraction of smallest-|w| Linear weights, one threshold for all layers.

    Only zeros: shapes, parameter counts and dense FLOPs stay the same, and so does dense
    latency. Fine-tuning regrows the zeros unless `apply_masks_(model, masks)` runs after
    every optimizer step (masks from `sparsity_masks` taken right after pruning).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = [m for name, m in named_modules_of(model, nn.Linear) if selected(filter_fn, m, name)]
    if not layers or sparsity == 0:
        return model
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[torch.argsort(magnitudes)[: round(sparsity * len(magnitudes))]] = False
    with torch.no_grad():
        for m, mask in zip(layers, keep.split([m.weight.numel() for m in layers]), strict=True):
            m.weight.mul_(mask.view_as(m.weight))
    return model


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{Linear name: weight != 0} for keeping unstructured zeros through fine-tuning."""
    return {name: m.weight.detach() != 0 for name, m in named_modules_of(model, nn.Linear)}


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Re-zero the masked weights (call after each optimizer step while fine-tuning)."""
    with torch.no_grad():
        for name, m in named_modules_of(model, nn.Linear):
            if name in masks:
                m.weight.mul_(masks[name])
    return model


def sparse_storage_bytes(model: nn.Module, value_bytes: int | None = None) -> dict[str, float]:
    """Bytes the Linear weights take dense vs in CSR (values + column indices + row pointers).

    This is the only thing unstructured sparsity changes: storage in a sparse format.
    Nothing here runs faster; dense kernels multiply the zeros too. Column indices are
    int16 when a layer has at most 2^15 inputs, else int32; row pointers are int32.
    Biases and embeddings are left out (they are never pruned unstructured).

    Args:
        model: any module; every nn.Linear weight is counted.
        value_bytes: bytes per stored value (1 for int8 weights); default the weight dtype's.

    Returns:
        {"dense_bytes", "csr_bytes", "best_bytes" (per layer the smaller of the two),
        "sparsity" (fraction of zero weights)}.
    """
    dense = csr = best = zeros = total = 0
    for _, m in named_modules_of(model, nn.Linear):
        w = m.weight.detach()
        n_rows, n_cols = w.shape
        vb = value_bytes or w.element_size()
        nnz = int(torch.count_nonzero(w))
        layer_dense = w.numel() * vb
        layer_csr = nnz * (vb + (2 if n_cols <= 2**15 else 4)) + (n_rows + 1) * 4
        dense, csr, best = dense + layer_dense, csr + layer_csr, best + min(layer_dense, layer_csr)
        zeros, total = zeros + w.numel() - nnz, total + w.numel()
    return {"dense_bytes": dense, "csr_bytes": csr, "best_bytes": best, "sparsity": zeros / max(total, 1)}
