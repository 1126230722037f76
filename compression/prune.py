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

The steps live in `prune_layers` (hidden units, cross rank), `prune_embeddings` (rows)
and `prune_unstructured` (zeros); this module holds the config, the entry point that runs
them, and `prune_summary`.

Pruning replaces parameters: build the optimizer for fine-tuning after it. The model's
config is updated to the new sizes, so `TwoTower(model.config, space, model_tables(model))`
(or `Ranker(...)`) rebuilds the pruned shapes and loads its state dict strictly
(`model_tables` is in `prune_embeddings`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from slimrec.compression.module_surgery import FilterFn, named_modules_of, selected
from slimrec.compression.prune_embeddings import embedding_rows, share_rare_rows_
from slimrec.compression.prune_layers import (
    cross_dim,
    cross_rank,
    hidden_unit_pairs,
    is_low_rank,
    reduce_cross_rank_,
    remove_hidden_units,
    taylor_scores,
    weight_norm_scores,
)
from slimrec.compression.prune_unstructured import magnitude_prune_, sparse_storage_bytes
from slimrec.models.ranker import CrossLayer, Ranker
from slimrec.models.two_tower import TwoTower
from torch import nn

IMPORTANCE = ("weight_norm", "taylor")


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


# --- the entry point ---------------------------------------------------------------------------


def prune_(
    model: nn.Module,
    config: PruneConfig,
    importance_batches: Any = None,
    *,
    user_counts: Any = None,
    item_counts: Any = None,
) -> nn.Module:
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

    pairs = [p for p in hidden_unit_pairs(model) if selected(config.filter_fn, p.layer_in, p.name)]
    if pairs and config.keep_fraction < 1:
        if config.importance == "taylor":
            scores = taylor_scores(model, pairs, importance_batches)
        else:
            scores = [weight_norm_scores(p.layer_in, p.layer_out) for p in pairs]
        keep = [_top(s, _n_keep(len(s), config.keep_fraction, config.min_units)) for s in scores]
        remove_hidden_units(model, pairs, keep)

    if config.prune_cross_rank and config.cross_keep_fraction < 1:
        for name, layer in named_modules_of(model, CrossLayer):
            if not selected(config.filter_fn, layer, name):
                continue
            rank = max(1, math.ceil(config.cross_keep_fraction * cross_rank(layer) - 1e-9))
            dim = cross_dim(layer)
            if is_low_rank(layer) or 2 * rank * dim < dim * dim:  # else the factors outweigh W
                reduce_cross_rank_(layer, rank)

    if config.embedding_min_count > 0:
        share_rare_rows_(model, user_counts, item_counts, config.embedding_min_count, config.filter_fn)
    if config.unstructured_sparsity > 0:
        magnitude_prune_(model, config.unstructured_sparsity, config.filter_fn)
    _sync_configs(model)
    return model


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
        "linear_sparsity": pair(
            sparse_storage_bytes(before)["sparsity"], sparse_storage_bytes(after)["sparsity"]
        ),
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
        return sum(lin.in_features * lin.out_features for _, lin in named_modules_of(m, nn.Linear))

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
                warnings.warn(
                    "the user tower's history rows and the item tower's rows now differ; "
                    "TwoTower(config, space, tables) cannot rebuild this model",
                    stacklevel=3,
                )
        elif isinstance(m, Ranker):
            ranks = {(cross_rank(c) if is_low_rank(c) else None) for c in _cross_layers(m)}
            deep = tuple(lin.out_features for lin in m.deep if isinstance(lin, nn.Linear))
            m.config = replace(m.config, deep=deep)
            if len(ranks) == 1:
                m.config = replace(m.config, cross_rank=ranks.pop())
            elif ranks:
                warnings.warn(
                    f"cross layers now differ in rank {ranks}; RankerConfig.cross_rank cannot "
                    "describe them, so Ranker(config, ...) cannot rebuild this model",
                    stacklevel=3,
                )


def _cross_layers(ranker: Ranker) -> list[CrossLayer]:
    """`ranker.cross` (an nn.ModuleList, so typed Module), checked to hold CrossLayers."""
    layers = []
    for c in ranker.cross:
        if not isinstance(c, CrossLayer):
            raise TypeError(f"Ranker.cross must hold CrossLayer modules, got {type(c).__name__}")
        layers.append(c)
    return layers


def _n_keep(n: int, fraction: float, minimum: int) -> int:
    return min(n, max(minimum, math.ceil(fraction * n - 1e-9)))


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order."""
    return torch.topk(scores, k).indices.sort().values
