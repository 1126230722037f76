"""Structured pruning of Linear layers: hidden units of MLPs and the ranker's head, cross-layer rank.

- Hidden units: every Linear -> ReLU (-> Dropout) -> Linear pair in an MLP, and the
  ranker's last deep layer -> ReLU -> `head`, loses its least important hidden units
  (`weight_norm_scores` or `taylor_scores`). Smaller nn.Linear layers are rebuilt, so
  parameters and FLOPs really drop. Tower output layers keep their width: it is the
  embedding space.
- Cross layers (DCN-v2): a full-rank W becomes its truncated SVD in CrossLayer's
  low-rank form; a low-rank W drops its weakest rank dimensions (`reduce_cross_rank_`).

`slimrec.compression.prune.prune_` decides what to cut; this module does the cutting.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import Any, cast

import torch
from slimrec.compression.module_surgery import join_name, linear_from, named_modules_of, replace_module
from slimrec.models.ranker import CrossLayer, Ranker
from torch import nn

# --- hidden units ------------------------------------------------------------------------------


@dataclass
class HiddenUnitPair:
    """Hidden units = outputs of `layer_in` = inputs of `layer_out`; `name` is layer_in's."""

    name: str
    layer_in: nn.Linear
    layer_out: nn.Linear


def hidden_unit_pairs(model: nn.Module) -> list[HiddenUnitPair]:
    """Every prunable hidden layer: Linear -> ReLU (-> Dropout) -> Linear inside an MLP
    nn.Sequential, plus a Ranker's last deep layer -> deep_activation -> head."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or not all(
            isinstance(m, nn.Linear | nn.ReLU | nn.Dropout) for m in seq
        ):
            continue  # low-rank cross factors are a Sequential too, with no ReLU between them
        layers = list(seq)
        linear = [(i, m) for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        for (i, layer_in), (j, layer_out) in pairwise(linear):
            if any(isinstance(m, nn.ReLU) for m in layers[i + 1 : j]):
                pairs.append(HiddenUnitPair(join_name(prefix, str(i)), layer_in, layer_out))
    for prefix, ranker in named_modules_of(model, Ranker):
        if len(ranker.deep):
            last = len(ranker.deep) - 1
            layer_in = ranker.deep[last]
            if not isinstance(layer_in, nn.Linear):
                raise TypeError(
                    f"{join_name(prefix, f'deep.{last}')}: a Ranker's last deep layer must be an nn.Linear, "
                    f"got {type(layer_in).__name__}"
                )
            pairs.append(HiddenUnitPair(join_name(prefix, f"deep.{last}"), layer_in, ranker.head))
    return pairs


def weight_norm_scores(layer_in: nn.Linear, layer_out: nn.Linear) -> torch.Tensor:
    """[n] importance of each hidden unit: ||(W_in[j, :], b_in[j])||_2 * ||W_out[:, j]||_2.

    The bias is part of the input norm: a unit with zero weights but a positive bias
    still feeds a constant into the next layer.
    """
    w_in = layer_in.weight.detach()
    if layer_in.bias is not None:
        w_in = torch.cat([w_in, layer_in.bias.detach()[:, None]], dim=1)
    return w_in.norm(dim=1) * layer_out.weight.detach().norm(dim=0)


def taylor_scores(
    model: nn.Module, pairs: list[HiddenUnitPair], importance_batches: Any
) -> list[torch.Tensor]:
    """[n] per pair: sum over examples of |a_j * dL/da_j| (Molchanov et al., ICLR 2017).

    a_j is hidden unit j after its activation, i.e. the input of `layer_out`; the sum is
    the first-order change of the loss if the unit were removed. Runs in eval mode (no
    dropout), leaves parameter .grad untouched.
    """
    scores = [torch.zeros(p.layer_out.in_features) for p in pairs]
    captured: list[tuple[int, torch.Tensor]] = []

    def capture(k: int):
        return lambda module, args: captured.append((k, args[0]))

    handles = [p.layer_out.register_forward_pre_hook(capture(k)) for k, p in enumerate(pairs)]
    was_training = model.training
    model.eval()
    try:
        losses = importance_batches() if callable(importance_batches) else importance_batches
        n_losses = 0
        for loss in losses:
            if not captured:
                raise ValueError(
                    "importance_batches: a loss arrived with no forward pass of the pruned "
                    "layers before it; compute each loss inside the iteration (a generator)"
                )
            if not loss.requires_grad or not all(x.requires_grad for _, x in captured):
                raise ValueError(
                    "importance_batches: losses must be computed with gradients enabled "
                    "and trainable layers below the pruned ones"
                )
            grads = torch.autograd.grad(loss, [x for _, x in captured], allow_unused=True)
            for (k, x), g in zip(captured, grads, strict=True):
                if g is not None:
                    scores[k] += (x.detach() * g).abs().reshape(-1, x.shape[-1]).sum(0).to(scores[k])
            captured.clear()
            n_losses += 1
        if n_losses == 0:
            raise ValueError("importance_batches yielded no losses")
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return scores


def remove_hidden_units(model: nn.Module, pairs: list[HiddenUnitPair], keep: list[torch.Tensor]) -> None:
    """Rebuild every touched Linear once with its kept rows (own units) and columns (inputs)."""
    rows: dict[int, torch.Tensor] = {}
    cols: dict[int, torch.Tensor] = {}
    layers: dict[int, nn.Linear] = {}
    for pair, kept in zip(pairs, keep, strict=True):
        if len(kept) == pair.layer_in.out_features:
            continue
        rows[id(pair.layer_in)], cols[id(pair.layer_out)] = kept, kept
        layers[id(pair.layer_in)], layers[id(pair.layer_out)] = pair.layer_in, pair.layer_out
    for key, layer in layers.items():
        replace_module(model, layer, _sliced_linear(layer, rows.get(key), cols.get(key)))


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    return linear_from(w, b, like=layer)


# --- cross layers ------------------------------------------------------------------------------


def is_low_rank(layer: CrossLayer) -> bool:
    """Whether the cross layer holds W as low-rank factors (U V^T) rather than one Linear."""
    return isinstance(layer.w, nn.Sequential)


def _down(w: nn.Sequential) -> nn.Linear:
    """The first factor, Linear(dim, r), of a low-rank W (CrossLayer and reduce_cross_rank_ build it so)."""
    return cast(nn.Linear, w[0])


def cross_rank(layer: CrossLayer) -> int:
    """Rank of the cross layer's W: dim for the full-rank form, r for U V^T."""
    w = layer.w
    return _down(w).out_features if isinstance(w, nn.Sequential) else w.in_features


def cross_dim(layer: CrossLayer) -> int:
    """Width of the cross layer's input (= output)."""
    w = layer.w
    return _down(w).in_features if isinstance(w, nn.Sequential) else w.in_features


def reduce_cross_rank_(layer: CrossLayer, rank: int) -> CrossLayer:
    """Give `layer` the best rank-`rank` W (Eckart-Young), in the low-rank form, in place.

    A full-rank W = U S V^T becomes Linear(dim, r, bias=False) with weight S_r^1/2 V_r^T
    and Linear(r, dim) with weight U_r S_r^1/2 and W's bias: exact (to float rounding) at
    rank = dim. A low-rank W = U V^T is first refactored into that balanced SVD form (the
    same product), where ||U col k|| * ||V row k|| is the k-th singular value, and its
    weakest rank dimensions are dropped. A low-rank layer already at `rank` is untouched.
    The factors have 2 * dim * r weights, fewer than dim^2 only when r < dim / 2.

    Args:
        layer: a CrossLayer, full or low rank.
        rank: 1 <= rank <= current rank.
    """
    current = cross_rank(layer)
    if not 1 <= rank <= current:
        raise ValueError(f"rank must be in [1, {current}] for this cross layer, got {rank}")
    if isinstance(layer.w, nn.Sequential):  # low rank
        if rank == current:
            return layer
        down, up = (cast(nn.Linear, m) for m in layer.w)  # Linear(dim, r), Linear(r, dim): see _down
        w, bias = up.weight.detach() @ down.weight.detach(), up.bias
        like = up
    else:
        w, bias, like = layer.w.weight.detach(), layer.w.bias, layer.w
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    down_w, up_w = (root[:, None] * vh[:rank]).to(w.dtype), (u[:, :rank] * root).to(w.dtype)
    layer.w = nn.Sequential(
        linear_from(down_w, None, like=like),
        linear_from(up_w, None if bias is None else bias.detach(), like=like),
    )
    return layer
