"""PROTOCOL.md metrics for in-memory PyTorch models (training's model selection).

Artifacts, as served through ONNX Runtime and FAISS, are scored by
`compression.served.evaluate_artifact`, which reuses the same stage functions here
(`exclude_and_top_k`, `two_stage_top_k`) so that both paths rank identically.
"""

from __future__ import annotations

import numpy as np
import torch
from slimrec.artifact.user_state import csr_rows
from slimrec.models.device import module_device
from slimrec.models.fold import Fold
from slimrec.models.ranker import Ranker
from slimrec.models.ranking_metrics import ranking_metrics
from slimrec.models.top_k import top_k_excluding
from slimrec.models.two_tower import TwoTower

RETRIEVAL_KS = (10, 50, 200)
USER_BATCH = 1024


@torch.no_grad()
def user_embeddings(model: TwoTower, fold: Fold, users: np.ndarray) -> np.ndarray:
    model.eval()
    device, out = module_device(model), []
    for s in range(0, len(users), USER_BATCH):
        inputs = [torch.from_numpy(a).to(device) for a in fold.user_state(users[s : s + USER_BATCH])]
        out.append(model.user_tower(*inputs).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def item_embeddings(model: TwoTower, n_items: int) -> np.ndarray:
    model.eval()
    return model.item_embeddings(n_items).cpu().numpy()


def exact_top_k(
    user_emb: np.ndarray, item_emb: np.ndarray, k: int, exclude: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k over the whole catalogue, excluded items removed.

    Returns (items [U, k] with -1 padding, scores [U, k]); processed in user blocks to bound memory.
    """
    indptr, excluded = exclude
    items, scores = [], []
    block = max(1, min(USER_BATCH, 2**25 // max(1, len(item_emb))))  # bounds the [block, n_items] scores
    for s in range(0, len(user_emb), block):
        e = min(s + block, len(user_emb))
        block_scores = user_emb[s:e] @ item_emb.T  # a new name: `block` is the step of the loop
        top = top_k_excluding(block_scores, k, indptr[s : e + 1] - indptr[s], excluded[indptr[s] : indptr[e]])
        items.append(top)
        scores.append(np.where(top >= 0, np.take_along_axis(block_scores, np.maximum(top, 0), 1), -np.inf))
    return np.concatenate(items), np.concatenate(scores).astype(np.float32)


def evaluate_retrieval(model: TwoTower, fold: Fold) -> dict[str, float]:
    users = fold.eval_users
    top, _ = exact_top_k(
        user_embeddings(model, fold, users),
        item_embeddings(model, fold.dataset.n_items),
        max(RETRIEVAL_KS),
        fold.eval_exclude,
    )
    return ranking_metrics(top, *fold.eval_relevant, ks=RETRIEVAL_KS)


@torch.no_grad()
def ranker_logits(
    ranker: Ranker, fold: Fold, users: np.ndarray, candidates: np.ndarray, batch_users: int = 64
) -> np.ndarray:
    """Ranker logits [U, C] for candidate item indices [U, C] (-1 padding gets -inf)."""
    ranker.eval()
    device, out = module_device(ranker), []
    for s in range(0, len(users), batch_users):
        cand = candidates[s : s + batch_users]
        inputs = [*fold.user_state(users[s : s + batch_users]), np.maximum(cand, -1) + 1]
        logits = ranker(*(torch.from_numpy(a).to(device) for a in inputs)).cpu().numpy()
        out.append(np.where(cand >= 0, logits, -np.inf))
    return np.concatenate(out).astype(np.float32)


def blend(logits: np.ndarray, retrieval_scores: np.ndarray, retrieval_weight: float) -> np.ndarray:
    """The ranking stage's final score: ranker logit plus a weighted retrieval score."""
    return logits + retrieval_weight * retrieval_scores if retrieval_weight else logits


def top_k_of_candidates(candidates: np.ndarray, final_scores: np.ndarray, k: int) -> np.ndarray:
    """Re-order candidates [U, C] by score (stable on ties: retrieval order wins) and keep k."""
    order = np.argsort(-final_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, 1)


def retrieve_candidates(
    model: TwoTower, fold: Fold, n_candidates: int = 200, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The first stage for the fold's scored users: (items [U, C] -1 padded, scores / temperature [U, C]).
    `rows`: only these positions of `fold.eval_users`, in this order."""
    users, exclude = eval_subset(fold, rows)
    cands, cand_scores = exact_top_k(
        user_embeddings(model, fold, users),
        item_embeddings(model, fold.dataset.n_items),
        n_candidates,
        exclude,
    )
    return cands, cand_scores / model.config.temperature


def eval_subset(fold: Fold, rows: np.ndarray | None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """(users, their excluded items) of the fold's scored users, or of these positions among them."""
    if rows is None:
        return fold.eval_users, fold.eval_exclude
    return fold.eval_users[rows], csr_rows(*fold.eval_exclude, rows)


def evaluate_ranked(
    ranker: Ranker,
    fold: Fold,
    candidates: tuple[np.ndarray, np.ndarray],
    retrieval_weights: tuple[float, ...] = (0.0,),
    rows: np.ndarray | None = None,
) -> dict[float, dict[str, float]]:
    """Two-stage metrics per retrieval weight, the first stage given (`retrieve_candidates`): a
    ranker trained on one retrieval model re-ranks the same candidates every epoch. `rows`: as
    the candidates were retrieved (positions of `fold.eval_users`)."""
    cands, scaled = candidates
    users, _ = eval_subset(fold, rows)
    relevant = fold.eval_relevant if rows is None else csr_rows(*fold.eval_relevant, rows)
    logits = ranker_logits(ranker, fold, users, cands)
    return {
        w: ranking_metrics(
            top_k_of_candidates(cands, blend(logits, scaled, w), max(RETRIEVAL_KS)),
            *relevant,
            ks=RETRIEVAL_KS,
        )
        for w in retrieval_weights
    }
