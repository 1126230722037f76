"""Choose the compressed index's search depth by measuring recall@200 against exact search."""

from __future__ import annotations

import numpy as np
import torch
from slimrec.artifact.index import IndexSpec, build_item_index, recall_at_k
from slimrec.models.evaluate import user_embeddings
from slimrec.models.train import FoldModels, log

K = 200


def tune_index(models: FoldModels, tuning, seed: int = 0) -> IndexSpec:
    """Smallest nprobe in the grid whose recall@200 vs exact reaches the target (validation users).

    `tuning` is a pipeline IndexTuning. Falls back to the grid's largest nprobe, saying so.
    """
    fold = models.fold
    with torch.no_grad():
        items = models.two_tower.item_embeddings(fold.dataset.n_items).numpy()
    queries = user_embeddings(models.two_tower, fold, fold.eval_users)
    exact = build_item_index(items, IndexSpec("flat")).search(queries, K)[1]
    index = build_item_index(items, IndexSpec(tuning.kind, nprobe=tuning.nprobe_grid[0]), seed=seed)
    recall = 0.0
    for nprobe in tuning.nprobe_grid:
        index.spec.nprobe = nprobe
        index.apply_search_params()
        recall = recall_at_k(index.search(queries, K)[1], exact)
        log(f"index {tuning.kind}: nprobe {nprobe:>4}  recall@{K} vs exact {recall:.4f}")
        if recall >= tuning.target_recall:
            break
    else:
        log(f"index {tuning.kind}: recall target {tuning.target_recall} not reached; using nprobe {nprobe}")
    return IndexSpec(tuning.kind, nlist=index_nlist(index), nprobe=nprobe)


def index_nlist(index) -> int | None:
    import faiss

    try:
        return int(faiss.extract_index_ivf(index.index).nlist)
    except RuntimeError:
        return None


def measured_recall(items: np.ndarray, queries: np.ndarray, spec: IndexSpec, seed: int = 0) -> float:
    exact = build_item_index(items, IndexSpec("flat")).search(queries, K)[1]
    return recall_at_k(build_item_index(items, spec, seed=seed).search(queries, K)[1], exact)
