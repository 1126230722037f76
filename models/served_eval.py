"""`slimrec evaluate`: PROTOCOL.md metrics of an artifact, through the served path.

For each model in the artifact ("selection/" scored on validation, the served
one on test):
  - retrieval: exact top-K over the whole catalogue (item vectors from item_tower.onnx),
  - two_stage: the request path of `ServedModel.recommend` (index top-200 -> ranker -> top-K),
  - history_only: two_stage for the same users sent as new users (their history, no id, no features),
  - ranker: AUC and log loss on held-out positives against sampled negatives.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from slimrec.artifact import Artifact
from slimrec.artifact.ort import run_session
from slimrec.artifact.runtime import ServedModel, UserBatch
from slimrec.artifact.user_state import sent_user_features
from slimrec.models.classification_metrics import auc, log_loss
from slimrec.models.data import Dataset
from slimrec.models.evaluate import RETRIEVAL_KS
from slimrec.models.package import SELECTION_PREFIX, SERVED_PREFIX
from slimrec.models.ranking_metrics import per_user_ndcg_at_10, ranking_metrics
from slimrec.models.split import TEST, VALID, Split, protocol_split
from slimrec.models.top_k import top_k_excluding

BATCH = 256
PREFIX_FOLD = {SELECTION_PREFIX: ("valid", VALID), SERVED_PREFIX: ("test", TEST)}


def check_dataset(artifact: Artifact, dataset: Dataset) -> None:
    expected = artifact.manifest["data"].get("fingerprint")
    if expected and expected != dataset.fingerprint():
        raise ValueError(
            f"{artifact.path}: trained on {artifact.manifest['data'].get('dataset')!r} "
            f"(fingerprint {expected[:12]}), but the data given has fingerprint "
            f"{dataset.fingerprint()[:12]}"
        )


def relevant_sets(dataset: Dataset, fold: int, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR over `users` of their items in `fold`."""
    return fold_items(protocol_split(dataset), dataset.n_users, fold, users)


def fold_items(split: Split, n_users: int, fold: int, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CSR over `users` (in order) of their items in `fold` of `split`; other users' are left out."""
    from slimrec.models.csr import csr_from_pairs

    slot = np.full(n_users, -1)
    slot[users] = np.arange(len(users))
    rows = np.flatnonzero((split.fold == fold) & (slot[split.user] >= 0))
    return csr_from_pairs(slot[split.user[rows]], split.item[rows], len(users))


def item_vectors(model: ServedModel, threads: int = 0) -> np.ndarray:
    """Every item's embedding from the exported item tower (the exact retrieval reference);
    `threads`: ONNX Runtime's intra-op threads (0: all cores)."""
    sess = model.artifact.file(f"{model.prefix}item_tower.onnx")
    from slimrec.artifact.ort import session

    tower = session(sess, threads=threads)
    codes = np.arange(1, model.n_items + 1, dtype=np.int64)
    return np.concatenate(
        [run_session(tower, item_code=codes[s : s + 65536]) for s in range(0, len(codes), 65536)]
    )


def evaluate_model(
    model: ServedModel, dataset: Dataset, fold: int, n_candidates: int = 200, seed: int = 0, threads: int = 0
) -> dict:
    split = protocol_split(dataset)
    users = np.unique(split.user[split.fold == fold])
    relevant = relevant_sets(dataset, fold, users)
    vectors = item_vectors(model, threads)
    retrieved, served = served_lists(model, users, n_candidates, vectors=vectors)
    _, history_only = served_lists(model, users, n_candidates, as_new_users=True, vectors=vectors)
    return {
        "users": int(len(users)),
        "retrieval": ranking_metrics(retrieved, *relevant, ks=RETRIEVAL_KS),
        "two_stage": ranking_metrics(served, *relevant, ks=RETRIEVAL_KS),
        "history_only": ranking_metrics(history_only, *relevant, ks=RETRIEVAL_KS),
        "ranker": ranker_classification(model, users, relevant, split, seed),
    }


def served_lists(
    model: ServedModel,
    users: np.ndarray,
    n_candidates: int = 200,
    as_new_users: bool = False,
    vectors: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(exact retrieval top-200, the served two-stage top-200) of `users`, int [B, 200], -1 padded.

    as_new_users: each user is sent as the server sees a new user, by the history alone (user
    code 0, no side features) with the same window of their fitted items; seen items are still
    excluded, so the figures compare with the known-user ones. `vectors`: `item_vectors(model)`,
    when the caller has them already.
    """
    vectors = item_vectors(model) if vectors is None else vectors
    k = max(RETRIEVAL_KS)
    retrieved, served = [], []
    for s in range(0, len(users), BATCH):
        batch = model.known_users(users[s : s + BATCH])
        if as_new_users:
            batch = anonymous(model, batch)
        emb = model.embed(batch)
        retrieved.append(top_k_excluding(emb @ vectors.T, k, batch.exclude_indptr, batch.exclude_items))
        served.append(_pad(model.recommend(batch, k, n_candidates).items, k))
    return np.concatenate(retrieved), np.concatenate(served)


def anonymous(model: ServedModel, batch: UserBatch) -> UserBatch:
    """The batch with who the users are removed: user code 0 and unknown side features."""
    unknown = sent_user_features(model.space, [{}] * len(batch.codes))
    return replace(batch, codes=np.zeros_like(batch.codes), features=unknown)


def per_user_ndcg(
    model: ServedModel, dataset: Dataset, fold: int, as_new_users: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(users of `fold`, each one's two-stage NDCG@10 on it): the unit of a paired comparison."""
    split = protocol_split(dataset)
    users = np.unique(split.user[split.fold == fold])
    _, served = served_lists(model, users, as_new_users=as_new_users)
    return users, per_user_ndcg_at_10(served, *relevant_sets(dataset, fold, users))


def ranker_classification(model: ServedModel, users, relevant, split, seed: int, n_negatives: int = 50):
    """AUC / log loss of the ranker: held-out positives vs items the user never rated (uniform)."""
    rng = np.random.default_rng(seed)
    indptr, items = relevant
    width = int(np.diff(indptr).max()) + n_negatives
    cands = np.full((len(users), width), -1, np.int64)
    labels = np.zeros((len(users), width), np.float32)
    for j, u in enumerate(users):  # assembling rows only; scoring below is batched
        pos = items[indptr[j] : indptr[j + 1]]
        seen = split.item[split.user_start[u] : split.user_start[u + 1]]
        neg = rng.integers(0, model.n_items, 4 * n_negatives)
        neg = np.unique(neg[~np.isin(neg, seen)])[:n_negatives]
        cands[j, : len(pos)], labels[j, : len(pos)] = pos, 1
        cands[j, len(pos) : len(pos) + len(neg)] = neg
    logits = []
    for s in range(0, len(users), BATCH):
        batch = model.known_users(users[s : s + BATCH], exclude_seen=False)
        logits.append(
            run_session(
                model.ranker,
                user_code=batch.codes,
                user_features=batch.features,
                history=batch.history,
                candidates=np.maximum(cands[s : s + BATCH], -1) + 1,
            )
        )
    logits = np.concatenate(logits)
    keep = cands >= 0
    z = logits[keep].astype(np.float64)
    return {
        "auc": auc(labels[keep], z),
        "log_loss": log_loss(labels[keep], 1 / (1 + np.exp(-z))),
        "negatives": f"{n_negatives} per user, uniform over items the user never rated (seed {seed})",
    }


def evaluate_artifact(artifact: Artifact, dataset: Dataset, threads: int = 0) -> dict:
    """Metrics keyed as PROTOCOL.md asks: {"retrieval": {"valid": .., "test": ..}, "two_stage": ..}."""
    check_dataset(artifact, dataset)
    out: dict = {"retrieval": {}, "two_stage": {}, "history_only": {}, "ranker": {}}
    for prefix, (name, fold) in PREFIX_FOLD.items():
        if prefix not in artifact.config["models"]:
            continue
        model = ServedModel(artifact, prefix, threads=threads)
        result = evaluate_model(model, dataset, fold, threads=threads)
        for key in out:
            out[key][name] = result[key]
    out["protocol"] = {
        "dataset": artifact.manifest["data"].get("dataset"),
        "split": "PROTOCOL.md",
        "variant": artifact.variant,
        "seed": artifact.config.get("train", {}).get("seed"),
    }
    return out


def _pad(items: np.ndarray, k: int) -> np.ndarray:
    if items.shape[1] >= k:
        return items
    return np.hstack([items, np.full((len(items), k - items.shape[1]), -1, items.dtype)])
