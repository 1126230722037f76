"""Choose the compressed index's search depth by measuring recall@200 against exact search.

One tuner for `slimrec compress` (validation users of the selection fold) and for the scale
benchmark (a sample of held-out users on a synthetic catalogue).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from slimrec.artifact.index import IndexSpec, build_item_index, recall_at_k, recall_within
from slimrec.models.evaluate import item_embeddings, user_embeddings
from slimrec.models.train import FoldModels, log

K = 200


@dataclass
class IndexTuning:
    kind: str = "ivf_sq8"
    target_recall: float = 0.99  # recall@200 of the compressed index against exact search
    nprobe_grid: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)

    def __post_init__(self):
        self.nprobe_grid = tuple(self.nprobe_grid)
        IndexSpec(self.kind)  # validates the kind
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"index.target_recall must be in (0, 1], got {self.target_recall}")


@dataclass
class TunedIndex:
    """The chosen spec, the recall per nprobe tried, and the seconds the index took to build."""

    spec: IndexSpec
    curve: list[dict] = field(default_factory=list)  # {nprobe, ms_per_query, recall, recall_strict}
    build_seconds: float = 0.0


def tune_index(
    models: FoldModels,
    tuning: IndexTuning,
    users: np.ndarray | None = None,
    seed: int = 0,
    recall_tolerance: float | None = None,
) -> TunedIndex:
    """Smallest nprobe in the grid whose recall@200 vs exact reaches the target on `users`' queries.

    `users` defaults to the fold's validation users; `recall_tolerance` as `tune_nprobe`.
    """
    fold = models.fold
    items = item_embeddings(models.two_tower, fold.dataset.n_items)
    queries = user_embeddings(models.two_tower, fold, fold.eval_users if users is None else users)
    return tune_nprobe(items, queries, tuning, seed, recall_tolerance)


def tune_nprobe(
    items: np.ndarray,
    queries: np.ndarray,
    tuning: IndexTuning,
    seed: int = 0,
    recall_tolerance: float | None = None,
) -> TunedIndex:
    """Build the IVF index once (timed), then raise nprobe along the grid until recall@K reaches the target.

    Args:
        items: [n_items, d] item vectors; queries: [n_queries, d] user vectors.
        recall_tolerance: None: the target is the strict set intersection (`recall_at_k`); a number:
            found items within it of the exact K-th best score count as hits (`recall_within`),
            which a large catalogue's near-ties need.
    Falls back to the grid's largest nprobe, saying so.
    """
    exact_scores, exact = build_item_index(items, IndexSpec("flat")).search(queries, K)
    t0 = time.perf_counter()
    index = build_item_index(items, IndexSpec(tuning.kind, nprobe=tuning.nprobe_grid[0]), seed=seed)
    build_seconds = time.perf_counter() - t0
    nlist, curve = index_nlist(index), []
    for nprobe in tuning.nprobe_grid:
        index.spec.nprobe = nprobe
        index.apply_search_params()
        t0 = time.perf_counter()
        found = index.search(queries, K)[1]
        ms = (time.perf_counter() - t0) * 1e3 / len(queries)
        strict = recall_at_k(found, exact)
        recall = (
            strict
            if recall_tolerance is None
            else recall_within(found, exact_scores, queries, items, recall_tolerance)
        )
        curve.append({"nprobe": nprobe, "ms_per_query": ms, "recall": recall, "recall_strict": strict})
        log(
            f"index {tuning.kind} nlist {nlist}: nprobe {nprobe:>4}  recall@{K} vs exact {recall:.4f} "
            f"(strict {strict:.4f})  {ms:.3f} ms/query"
        )
        if recall >= tuning.target_recall:
            break
    else:
        log(f"index {tuning.kind}: recall target {tuning.target_recall} not reached; using nprobe {nprobe}")
    return TunedIndex(IndexSpec(tuning.kind, nlist=nlist, nprobe=nprobe), curve, build_seconds)


def index_nlist(index) -> int | None:
    """IVF cells of a built ItemIndex; None for an index without them."""
    import faiss

    try:
        return int(faiss.extract_index_ivf(index.index).nlist)
    except RuntimeError:
        return None
