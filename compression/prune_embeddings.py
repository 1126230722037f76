"""Embedding-row pruning: ids with too few fitted interactions share row 0, and the tables shrink.

Row 0 is the shared fallback (unknown id) row; the code -> row buffers (`user_rows`,
`item_rows`) are rewritten to the compacted tables. `model_tables` hands the rewritten
buffers to a constructor, so a row-pruned model rebuilds from its config.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from slimrec.compression.module_surgery import FilterFn, embedding_from, join_name, replace_module, selected
from slimrec.models.ranker import Ranker
from slimrec.models.two_tower import ItemTower, TwoTower, UserTower
from torch import nn


def id_tables(model: nn.Module) -> list[tuple[str, nn.Module, str, str, str]]:
    """(name, owner, embedding path, rows buffer, "user"|"item") for every id embedding table."""
    tables: list[tuple[str, nn.Module, str, str, str]] = []
    for prefix, m in model.named_modules():
        if isinstance(m, UserTower):
            tables += [
                (join_name(prefix, "user_embedding"), m, "user_embedding", "user_rows", "user"),
                (join_name(prefix, "history.embedding"), m, "history.embedding", "item_rows", "item"),
            ]
        elif isinstance(m, ItemTower | Ranker):
            tables.append((join_name(prefix, "item_embedding"), m, "item_embedding", "item_rows", "item"))
    return tables


def share_rare_rows_(
    model: nn.Module, user_counts: Any, item_counts: Any, min_count: int, filter_fn: FilterFn | None = None
) -> nn.Module:
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
        if counts[kind] is None or not selected(filter_fn, embedding, name):
            continue
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(
                f"{name}: row pruning rebuilds an nn.Embedding, got {type(embedding).__name__} "
                "(prune rows before quantizing the tables)"
            )
        rows = getattr(owner, rows_name)
        count = torch.as_tensor(np.asarray(counts[kind]))
        if count.shape != (len(rows) - 1,):
            raise ValueError(
                f"{kind}_counts must have shape ({len(rows) - 1},) for {name}, got {tuple(count.shape)}"
            )
        new_rows = rows.clone()
        new_rows[1:][count < min_count] = 0
        kept = torch.unique(torch.cat([torch.zeros(1, dtype=torch.long, device=rows.device), new_rows]))
        remap = torch.full((embedding.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        remap[kept] = torch.arange(len(kept), device=rows.device)
        setattr(owner, rows_name, remap[new_rows])  # a registered buffer stays a buffer
        replace_module(model, embedding, embedding_from(embedding.weight.detach()[kept], like=embedding))
    return model


def embedding_rows(model: nn.Module) -> dict[str, int]:
    """Rows per id embedding table, by name."""
    return {
        # an int on nn.Embedding and on QuantizedEmbedding alike
        name: cast(int, owner.get_submodule(path).num_embeddings)
        for name, owner, path, _, _ in id_tables(model)
    }


def model_tables(model: TwoTower | Ranker) -> dict[str, torch.Tensor]:
    """The `tables` a constructor needs to rebuild this (possibly row-pruned) model from its config."""
    src = model.item_tower if isinstance(model, TwoTower) else model
    tables = {"item_rows": src.item_rows, "item_genres": src.item_genres, "item_year": src.item_year}
    if isinstance(model, TwoTower):
        tables["user_rows"] = model.user_tower.user_rows
    return {k: v.detach().clone() for k, v in tables.items()}
