"""Pruning: fewer hidden units, lower cross rank, fewer embedding rows, optional unstructured zeros.

`prune_(model, PruneConfig(...))` changes a TwoTower or Ranker (or a tower, or a bare
MLP) in place and returns it. What each part really changes:

- Hidden units (structured): every Linear -> ReLU (-> Dropout) -> Linear pair in an MLP,
  and the ranker's last deep layer -> ReLU -> `head`, loses its least important hidden
  units. Smaller nn.Linear layers are rebuilt, so parameters and FLOPs really drop.
  Tower output layers keep their width: it is the embedding space.
- Cross layers (DCN-v2): a full-rank W becomes its truncated SVD in CrossLayer's
  low-rank form; a low-rank W drops its weakest rank dimensions.
- Embedding rows: ids with too few fitted interactions share row 0 (the fallback row)
  and the tables are compacted; the code -> row buffers are rewritten to match.
- Unstructured magnitude pruning: zeros only. Dense kernels do the same work on zeros,
  so it buys nothing at inference; `sparse_storage_bytes` says what it saves on disk.

Pruning replaces parameters: build the optimizer for fine-tuning after it. The model's
config is updated to the new sizes, so `TwoTower(model.config, space, model_tables(model))`
(or `Ranker(...)`) rebuilds the pruned shapes and loads its state dict strictly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from slimrec.models.ranker import CrossLayer, Ranker
from slimrec.models.two_tower import ItemTower, TwoTower, UserTower
from torch import nn

IMPORTANCE = ("weight_norm", "taylor")
FilterFn = Callable[[nn.Module, str], bool]


@dataclass
class PruneConfig:
    """What `prune_` removes. `filter_fn(module, name)` returns True for modules to prune.

    It is asked about the Linear whose units would go (e.g. "user_tower.mlp.0"), each
    CrossLayer ("cross.1"), each id embedding ("user_tower.user_embedding") and, for
    unstructured pruning, each Linear.
    """

    version: int = 1
    keep_fraction: float = 0.5  # of each hidden layer's units (rounded up, at least min_units)
    importance: str = "weight_norm"  # "weight_norm" (no data) or "taylor" (needs importance_batches)
    min_units: int = 8
    prune_cross_rank: bool = True
    # Rank kept, as a fraction of dim (full-rank W) or of the current rank (low-rank W). A full-rank
    # W is only converted when the factors are smaller: rank < dim / 2. At 0.5 it would be a tie.
    cross_keep_fraction: float = 0.5
    embedding_min_count: int = 0  # 0: off; else ids with fewer fitted interactions share row 0
    unstructured_sparsity: float = 0.0  # fraction of Linear weights zeroed globally by magnitude
    filter_fn: FilterFn | None = None

    def __post_init__(self):
        def fail(name: str, expected: str) -> None:
            raise ValueError(f"PruneConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        if self.version != 1:
            fail("version", "1 (the only version this code knows)")
        if not 0 < self.keep_fraction <= 1:
            fail("keep_fraction", "in (0, 1]")
        if self.importance not in IMPORTANCE:
            fail("importance", f"one of {IMPORTANCE}")
        if not isinstance(self.min_units, int) or self.min_units < 1:
            fail("min_units", "an int >= 1")
        if not 0 < self.cross_keep_fraction <= 1:
            fail("cross_keep_fraction", "in (0, 1]")
        if not isinstance(self.embedding_min_count, int) or self.embedding_min_count < 0:
            fail("embedding_min_count", "an int >= 0")
        if not 0 <= self.unstructured_sparsity < 1:
            fail("unstructured_sparsity", "in [0, 1)")
        if self.filter_fn is not None and not callable(self.filter_fn):
            fail("filter_fn", "a callable (module, name) -> bool or None")

    def to_dict(self) -> dict:
        """JSON-ready fields; `filter_fn` is code, not data, and is left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "filter_fn"}

    @classmethod
    def from_dict(cls, d: dict) -> PruneConfig:
        unknown = set(d) - {f.name for f in fields(cls)} - {"filter_fn"}
        if unknown:
            raise ValueError(f"unknown PruneConfig fields {sorted(unknown)}")
        return cls(**d)


@dataclass
class HiddenUnitPair:
    """Hidden units = outputs of `layer_in` = inputs of `layer_out`; `name` is layer_in's."""

    name: str
    layer_in: nn.Linear
    layer_out: nn.Linear


# --- the entry point ---------------------------------------------------------------------------


def prune_(model: nn.Module, config: PruneConfig, importance_batches: Any = None, *,
           user_counts: Any = None, item_counts: Any = None) -> nn.Module:
    """Prune `model` in place as `config` says, and return it.

    Args:
        model: a TwoTower, Ranker, a tower or an nn.Sequential MLP.
        config: what to remove.
        importance_batches: for importance="taylor", a callable returning an iterable of
            scalar losses computed with `model` (or that iterable). Each forward must run
            inside the iteration (a generator), so the activations belong to the loss.
        user_counts, item_counts: fitted interactions per user / item index ([n_users],
            [n_items]; e.g. `fold.fit_counts`, `fold.item_popularity`); needed when
            config.embedding_min_count > 0.

    Returns:
        `model`, with smaller Linear layers, cross ranks and embedding tables, and its
        config updated to the new sizes.

    Example:
        >>> before = copy.deepcopy(model)
        >>> prune_(model, PruneConfig(keep_fraction=0.5))
        >>> prune_summary(before, model)["params"]["total"]
    """
    if not isinstance(config, PruneConfig):
        raise TypeError(f"config must be a PruneConfig, got {type(config).__name__}")
    if config.importance == "taylor" and importance_batches is None:
        raise ValueError("PruneConfig.importance='taylor' needs importance_batches (losses to differentiate)")
    if config.embedding_min_count > 0 and user_counts is None and item_counts is None:
        raise ValueError("PruneConfig.embedding_min_count > 0 needs user_counts and/or item_counts")

    pairs = [p for p in hidden_unit_pairs(model) if _selected(config.filter_fn, p.layer_in, p.name)]
    if pairs and config.keep_fraction < 1:
        if config.importance == "taylor":
            scores = taylor_scores(model, pairs, importance_batches)
        else:
            scores = [weight_norm_scores(p.layer_in, p.layer_out) for p in pairs]
        keep = [_top(s, _n_keep(len(s), config.keep_fraction, config.min_units)) for s in scores]
        _remove_hidden_units(model, pairs, keep)

    if config.prune_cross_rank and config.cross_keep_fraction < 1:
        for name, layer in _named(model, CrossLayer):
            if not _selected(config.filter_fn, layer, name):
                continue
            rank = max(1, math.ceil(config.cross_keep_fraction * cross_rank(layer) - 1e-9))
            dim = cross_dim(layer)
            if _is_low_rank(layer) or 2 * rank * dim < dim * dim:  # else the factors outweigh W
                reduce_cross_rank_(layer, rank)

    if config.embedding_min_count > 0:
        share_rare_rows_(model, user_counts, item_counts, config.embedding_min_count, config.filter_fn)
    if config.unstructured_sparsity > 0:
        magnitude_prune_(model, config.unstructured_sparsity, config.filter_fn)
    _sync_configs(model)
    return model


# --- hidden units ------------------------------------------------------------------------------


def hidden_unit_pairs(model: nn.Module) -> list[HiddenUnitPair]:
    """Every prunable hidden layer: Linear -> ReLU (-> Dropout) -> Linear inside an MLP
    nn.Sequential, plus a Ranker's last deep layer -> deep_activation -> head."""
    pairs = []
    for prefix, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential) or not all(
                isinstance(m, nn.Linear | nn.ReLU | nn.Dropout) for m in seq):
            continue  # low-rank cross factors are a Sequential too, with no ReLU between them
        layers = list(seq)
        linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
        for i, j in zip(linear, linear[1:]):
            if any(isinstance(m, nn.ReLU) for m in layers[i + 1:j]):
                pairs.append(HiddenUnitPair(_join(prefix, str(i)), layers[i], layers[j]))
    for prefix, ranker in _named(model, Ranker):
        if len(ranker.deep):
            last = len(ranker.deep) - 1
            pairs.append(HiddenUnitPair(_join(prefix, f"deep.{last}"), ranker.deep[last], ranker.head))
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


def taylor_scores(model: nn.Module, pairs: list[HiddenUnitPair],
                  importance_batches: Any) -> list[torch.Tensor]:
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
                raise ValueError("importance_batches: a loss arrived with no forward pass of the pruned "
                                 "layers before it; compute each loss inside the iteration (a generator)")
            if not loss.requires_grad or not all(x.requires_grad for _, x in captured):
                raise ValueError("importance_batches: losses must be computed with gradients enabled "
                                 "and trainable layers below the pruned ones")
            grads = torch.autograd.grad(loss, [x for _, x in captured], allow_unused=True)
            for (k, x), g in zip(captured, grads):
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


def _remove_hidden_units(model: nn.Module, pairs: list[HiddenUnitPair], keep: list[torch.Tensor]) -> None:
    """Rebuild every touched Linear once with its kept rows (own units) and columns (inputs)."""
    rows: dict[int, torch.Tensor] = {}
    cols: dict[int, torch.Tensor] = {}
    layers: dict[int, nn.Linear] = {}
    for pair, kept in zip(pairs, keep):
        if len(kept) == pair.layer_in.out_features:
            continue
        rows[id(pair.layer_in)], cols[id(pair.layer_out)] = kept, kept
        layers[id(pair.layer_in)], layers[id(pair.layer_out)] = pair.layer_in, pair.layer_out
    for key, layer in layers.items():
        _replace_module(model, layer, _sliced_linear(layer, rows.get(key), cols.get(key)))


def _sliced_linear(layer: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    if rows is not None:
        w, b = w[rows], None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    return _linear_from(w, b, like=layer)


# --- cross layers ------------------------------------------------------------------------------


def cross_rank(layer: CrossLayer) -> int:
    """Rank of the cross layer's W: dim for the full-rank form, r for U V^T."""
    return layer.w[0].out_features if _is_low_rank(layer) else layer.w.in_features


def cross_dim(layer: CrossLayer) -> int:
    """Width of the cross layer's input (= output)."""
    return layer.w[0].in_features if _is_low_rank(layer) else layer.w.in_features


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
    if _is_low_rank(layer):
        if rank == current:
            return layer
        down, up = layer.w
        w, bias = up.weight.detach() @ down.weight.detach(), up.bias
        like = up
    else:
        w, bias, like = layer.w.weight.detach(), layer.w.bias, layer.w
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    root = s[:rank].sqrt()
    down_w, up_w = (root[:, None] * vh[:rank]).to(w.dtype), (u[:, :rank] * root).to(w.dtype)
    layer.w = nn.Sequential(_linear_from(down_w, None, like=like),
                            _linear_from(up_w, None if bias is None else bias.detach(), like=like))
    return layer


# --- embedding rows ----------------------------------------------------------------------------


def id_tables(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    """(name, owner, embedding path, rows buffer, "user"|"item") for every id embedding table."""
    tables = []
    for prefix, m in model.named_modules():
        if isinstance(m, UserTower):
            tables += [(_join(prefix, "user_embedding"), m, "user_embedding", "user_rows", "user"),
                       (_join(prefix, "history.embedding"), m, "history.embedding", "item_rows", "item")]
        elif isinstance(m, ItemTower | Ranker):
            tables.append((_join(prefix, "item_embedding"), m, "item_embedding", "item_rows", "item"))
    return tables


def share_rare_rows_(model: nn.Module, user_counts: Any, item_counts: Any, min_count: int,
                     filter_fn: FilterFn | None = None) -> nn.Module:
    """Point ids with fewer than `min_count` fitted interactions at row 0, and drop unused rows.

    Row 0 is the shared fallback (unknown id) row and stays as it is; every other kept
    row keeps its exact vector, so a frequent id embeds as before. The `user_rows` /
    `item_rows` buffers are rewritten to the compacted rows. Handles the two-tower
    (user_embedding, item_embedding, history.embedding) and the ranker (item_embedding).
    `embedding_rows(model)` or `prune_summary` report the rows left per table.

    Args:
        model: TwoTower, Ranker or a tower.
        user_counts, item_counts: fitted interactions per user / item index (code - 1),
            shape [n_users] / [n_items]; None leaves those tables alone.
        min_count: ids with count < min_count fall back to row 0.
        filter_fn: (embedding, name) -> False keeps that table as it is.

    Returns:
        `model`.

    Example:
        >>> share_rare_rows_(model, fold.fit_counts, fold.item_popularity, min_count=5)
    """
    counts = {"user": user_counts, "item": item_counts}
    for name, owner, path, rows_name, kind in id_tables(model):
        embedding = owner.get_submodule(path)
        if counts[kind] is None or not _selected(filter_fn, embedding, name):
            continue
        rows = getattr(owner, rows_name)
        count = torch.as_tensor(np.asarray(counts[kind]))
        if count.shape != (len(rows) - 1,):
            raise ValueError(f"{kind}_counts must have shape ({len(rows) - 1},) for {name}, "
                             f"got {tuple(count.shape)}")
        new_rows = rows.clone()
        new_rows[1:][count < min_count] = 0
        kept = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long, device=rows.device), new_rows]))
        remap = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        remap[kept] = torch.arange(len(kept), device=rows.device)
        setattr(owner, rows_name, remap[new_rows])  # a registered buffer stays a buffer
        _replace_module(model, embedding, _embedding_from(embedding.weight.detach()[kept], like=embedding))
    return model


def embedding_rows(model: nn.Module) -> dict[str, int]:
    """Rows per id embedding table, by name."""
    return {name: owner.get_submodule(path).num_embeddings for name, owner, path, _, _ in id_tables(model)}


def model_tables(model: TwoTower | Ranker) -> dict[str, torch.Tensor]:
    """The `tables` a constructor needs to rebuild this (possibly row-pruned) model from its config."""
    src = model.item_tower if isinstance(model, TwoTower) else model
    tables = {"item_rows": src.item_rows, "item_genres": src.item_genres, "item_year": src.item_year}
    if isinstance(model, TwoTower):
        tables["user_rows"] = model.user_tower.user_rows
    return {k: v.detach().clone() for k, v in tables.items()}


# --- unstructured ------------------------------------------------------------------------------


def magnitude_prune_(model: nn.Module, sparsity: float, filter_fn: FilterFn | None = None) -> nn.Module:
    """Zero the `sparsity` fraction of smallest-|w| Linear weights, one threshold for all layers.

    Only zeros: shapes, parameter counts and dense FLOPs stay the same, and so does dense
    latency. Fine-tuning regrows the zeros unless `apply_masks_(model, masks)` runs after
    every optimizer step (masks from `sparsity_masks` taken right after pruning).
    """
    if not 0 <= sparsity < 1:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    layers = [m for name, m in _named(model, nn.Linear) if _selected(filter_fn, m, name)]
    if not layers or sparsity == 0:
        return model
    magnitudes = torch.cat([m.weight.detach().abs().flatten() for m in layers])
    keep = torch.ones_like(magnitudes, dtype=torch.bool)
    keep[torch.argsort(magnitudes)[:round(sparsity * len(magnitudes))]] = False
    with torch.no_grad():
        for m, mask in zip(layers, keep.split([m.weight.numel() for m in layers])):
            m.weight.mul_(mask.view_as(m.weight))
    return model


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{Linear name: weight != 0} for keeping unstructured zeros through fine-tuning."""
    return {name: m.weight.detach() != 0 for name, m in _named(model, nn.Linear)}


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Re-zero the masked weights (call after each optimizer step while fine-tuning)."""
    with torch.no_grad():
        for name, m in _named(model, nn.Linear):
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
    for _, m in _named(model, nn.Linear):
        w = m.weight.detach()
        n_rows, n_cols = w.shape
        vb = value_bytes or w.element_size()
        nnz = int(torch.count_nonzero(w))
        layer_dense = w.numel() * vb
        layer_csr = nnz * (vb + (2 if n_cols <= 2**15 else 4)) + (n_rows + 1) * 4
        dense, csr, best = dense + layer_dense, csr + layer_csr, best + min(layer_dense, layer_csr)
        zeros, total = zeros + w.numel() - nnz, total + w.numel()
    return {"dense_bytes": dense, "csr_bytes": csr, "best_bytes": best, "sparsity": zeros / max(total, 1)}


# --- report ------------------------------------------------------------------------------------


def prune_summary(before: nn.Module, after: nn.Module) -> dict[str, dict]:
    """Sizes before and after pruning, for the pipeline report.

    Args:
        before: a copy taken before `prune_` (it changes the model in place).
        after: the pruned model.

    Returns:
        {"params": {group: {before, after, ratio}} with groups like "user_tower.mlp",
         "cross", "head" and "total" (ratio = after / before, None when before is 0);
         "macs_per_example": {"user_tower" | "item_tower" | "ranker": {...}}: sum of
         in * out over Linear layers, per user, per item, per (request, candidate); dense
         FLOPs are about twice that, and unstructured zeros do not lower them;
         "embedding_rows": {table: {...}}; "linear_sparsity": {...}: zero weight fraction}.
    """
    def pair(b: float, a: float) -> dict[str, float | None]:
        return {"before": b, "after": a, "ratio": a / b if b else None}  # None: JSON has no NaN

    def merge(b: dict, a: dict) -> dict:
        return {k: pair(b.get(k, 0), a.get(k, 0)) for k in dict.fromkeys([*b, *a])}

    return {
        "params": merge(_params_by_group(before), _params_by_group(after)),
        "macs_per_example": merge(_macs_by_unit(before), _macs_by_unit(after)),
        "embedding_rows": merge(embedding_rows(before), embedding_rows(after)),
        "linear_sparsity": pair(sparse_storage_bytes(before)["sparsity"],
                                sparse_storage_bytes(after)["sparsity"]),
    }


def _params_by_group(model: nn.Module) -> dict[str, int]:
    """Parameter names cut at the first index ("cross.0.w.0.weight" -> "cross") or attribute."""
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        cut = next((i for i, s in enumerate(parts) if s.isdigit()), len(parts) - 1)
        key = ".".join(parts[:cut]) or name
        groups[key] = groups.get(key, 0) + p.numel()
    groups["total"] = sum(p.numel() for p in model.parameters())
    return groups


def _macs_by_unit(model: nn.Module) -> dict[str, int]:
    def macs(m: nn.Module) -> int:
        return sum(lin.in_features * lin.out_features for _, lin in _named(m, nn.Linear))

    if isinstance(model, TwoTower):
        return {"user_tower": macs(model.user_tower), "item_tower": macs(model.item_tower)}
    return {type(model).__name__.lower(): macs(model)}


# --- helpers -----------------------------------------------------------------------------------


def _sync_configs(model: nn.Module) -> None:
    """Write the pruned sizes into each TwoTower / Ranker config (a new object: configs may be shared)."""
    for _, m in model.named_modules():
        if isinstance(m, TwoTower):
            user = tuple(lin.out_features for lin in m.user_tower.mlp if isinstance(lin, nn.Linear))
            item = tuple(lin.out_features for lin in m.item_tower.mlp if isinstance(lin, nn.Linear))
            m.config = replace(m.config, user_hidden=user[:-1], item_hidden=item[:-1])
            if not torch.equal(m.user_tower.item_rows, m.item_tower.item_rows):
                warnings.warn("the user tower's history rows and the item tower's rows now differ; "
                              "TwoTower(config, space, tables) cannot rebuild this model", stacklevel=3)
        elif isinstance(m, Ranker):
            ranks = {(cross_rank(c) if _is_low_rank(c) else None) for c in m.cross}
            deep = tuple(lin.out_features for lin in m.deep if isinstance(lin, nn.Linear))
            m.config = replace(m.config, deep=deep)
            if len(ranks) == 1:
                m.config = replace(m.config, cross_rank=ranks.pop())
            elif ranks:
                warnings.warn(f"cross layers now differ in rank {ranks}; RankerConfig.cross_rank cannot "
                              "describe them, so Ranker(config, ...) cannot rebuild this model", stacklevel=3)


def _n_keep(n: int, fraction: float, minimum: int) -> int:
    return min(n, max(minimum, math.ceil(fraction * n - 1e-9)))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order."""
    return torch.topk(scores, k).indices.sort().values


def _is_low_rank(layer: CrossLayer) -> bool:
    return isinstance(layer.w, nn.Sequential)


def _selected(filter_fn: FilterFn | None, module: nn.Module, name: str) -> bool:
    return filter_fn is None or bool(filter_fn(module, name))


def _named(model: nn.Module, kind: type) -> list[tuple[str, Any]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kind)]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Swap `old` for `new` wherever it is a child (shared modules stay shared)."""
    for parent in model.modules():
        for key, child in list(parent.named_children()):
            if child is old:
                setattr(parent, key, new)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(like.weight.requires_grad)
    return layer.train(like.training)


def _embedding_from(weight: torch.Tensor, like: nn.Embedding) -> nn.Embedding:
    table = nn.Embedding(weight.shape[0], weight.shape[1], padding_idx=like.padding_idx,
                         max_norm=like.max_norm, sparse=like.sparse, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        table.weight.copy_(weight)
    table.requires_grad_(like.weight.requires_grad)
    return table.train(like.training)
