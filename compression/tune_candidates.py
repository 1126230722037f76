"""Choose the ranker's candidate budget (how many of the index's top items it ranks) on validation.

The ranker is most of a compressed request's model time, and its cost grows with the number
of candidates (ml-100k, one request, 1 thread: 250-290 us at 200, 108-110 us at 100). So the
budget is one more compression knob: `slimrec compress` scores validation two-stage NDCG@10
(the served path, PROTOCOL.md) at each budget of `GateConfig.candidate_budgets` with the
selection fold's models, for the validation users as known users and sent as new users (their
history alone, as `slimrec evaluate`'s history_only), walks down from the largest budget while
both figures stay within `candidate_tolerance` of the largest budget's and keeps the last that
did (a smaller budget is never chosen past a larger one that failed), records it in the
compressed artifact's manifest (`serving.n_candidates`, which the server uses unless told
otherwise) and says what it costs on test.

Each batch of users is embedded and searched once, at the largest budget; every budget ranks
a prefix of those candidates (a row's first n kept items do not depend on how deep it was
searched: `ServedModel.retrieve`). The ranker runs once per budget, on exactly the candidates
the server would hand it, so a dynamically quantized ranker is scored as served.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from slimrec.artifact import amend_artifact, load_artifact
from slimrec.artifact.runtime import ServedModel
from slimrec.compression.gate import GateConfig
from slimrec.models.data import Dataset
from slimrec.models.package import SELECTION_PREFIX, SERVED_PREFIX
from slimrec.models.ranking_metrics import per_user_ndcg_at_10, ranking_metrics
from slimrec.models.served_eval import BATCH, anonymous, fold_items
from slimrec.models.split import TEST, VALID, protocol_split
from slimrec.models.train import log

K = 10  # NDCG@10, the figure the budget is chosen on: what a k=10 request is served


def budget_lists(
    model: ServedModel, users: np.ndarray, budgets: tuple[int, ...], as_new_users: bool = False
) -> dict[int, np.ndarray]:
    """Each budget's served top-K of `users` (int [B, K] item indices, -1 padded), as
    `model.recommend(batch, K, n)` answers, retrieving once at the largest budget.
    `as_new_users`: as `slimrec.models.served_eval.served_lists`."""
    deepest = max(budgets)
    lists: dict[int, list[np.ndarray]] = {n: [] for n in budgets}
    for s in range(0, len(users), BATCH):
        batch = model.known_users(users[s : s + BATCH])
        if as_new_users:
            batch = anonymous(model, batch)
        cands, scores = model.retrieve(model.user_vectors(batch), deepest, batch)
        for n in budgets:
            final = model.rank(batch, cands[:, :n], scores[:, :n])
            order = np.argsort(-final, axis=1, kind="stable")[:, :K]
            lists[n].append(np.take_along_axis(cands[:, :n], order, 1))
    return {n: np.concatenate(parts) for n, parts in lists.items()}


def budget_figures(
    model: ServedModel, dataset: Dataset, fold: int, budgets: tuple[int, ...], as_new_users: bool = False
) -> list[dict[str, float]]:
    """Two-stage metrics at K=10 of `fold`'s users per budget (`budget_rows`)."""
    split = protocol_split(dataset)
    users = np.unique(split.user[split.fold == fold])
    relevant = fold_items(split, dataset.n_users, fold, users)  # the split once, not again inside
    return budget_rows(model, users, relevant, budgets, as_new_users)


def budget_rows(
    model: ServedModel,
    users: np.ndarray,
    relevant: tuple[np.ndarray, np.ndarray],
    budgets: tuple[int, ...],
    as_new_users: bool = False,
) -> list[dict[str, float]]:
    """Two-stage metrics at K=10 of `users` (their relevant items: CSR in their order) per budget,
    largest first; each row also gives its NDCG@10 change against the largest budget and the
    paired standard error of that change."""
    budgets = tuple(sorted(set(budgets), reverse=True))  # a budget named twice is scored once
    lists = budget_lists(model, users, budgets, as_new_users)
    reference = per_user_ndcg_at_10(lists[budgets[0]], *relevant)
    rows = []
    for n in budgets:
        metrics = ranking_metrics(lists[n], *relevant, ks=(K,))
        change = per_user_ndcg_at_10(lists[n], *relevant) - reference
        se = float(change.std(ddof=1) / np.sqrt(len(change))) if len(change) > 1 else 0.0
        rows.append(
            {
                "n_candidates": n,
                **{m: float(metrics[m]) for m in ("ndcg@10", "recall@10", "hr@10", "mrr@10")},
                "ndcg@10_change": float(change.mean()),
                "ndcg@10_change_se": se,
            }
        )
    return rows


def known_and_new(model: ServedModel, dataset: Dataset, fold: int, budgets: tuple[int, ...]):
    """`budget_figures` of `fold`'s users as known users, then sent as new users."""
    return tuple(budget_figures(model, dataset, fold, budgets, new) for new in (False, True))


def choose_budget(row_sets: list[list[dict[str, float]]], tolerance: float) -> int:
    """The smallest budget that passes, walking down from the largest and stopping at the first
    that fails: a budget passes when its NDCG@10 is >= the largest budget's x (1 - tolerance) in
    every set of rows (known users, new users; each set has a row per budget). A smaller budget
    that passes after a larger one failed is noise around the floor, not a safe choice.

    Example (tolerance 0.005: a budget needs NDCG@10 >= 0.2000 x 0.995 = 0.1990):
        >>> choose_budget([[{"n_candidates": 200, "ndcg@10": 0.2000}, {"n_candidates": 100,
        ...     "ndcg@10": 0.1985}, {"n_candidates": 50, "ndcg@10": 0.1995}]], 0.005)
        200
    """
    if not row_sets:
        raise ValueError("choose_budget: no rows")
    budgets = [sorted(int(r["n_candidates"]) for r in rows) for rows in row_sets]
    if any(b != budgets[0] for b in budgets):
        raise ValueError(f"choose_budget: the sets of rows score different budgets ({budgets})")
    passing = set(budgets[0])
    for rows in row_sets:
        floor = max(rows, key=lambda r: r["n_candidates"])["ndcg@10"] * (1 - tolerance)
        passing &= {int(r["n_candidates"]) for r in rows if r["ndcg@10"] >= floor}
    chosen = budgets[0][-1]  # the largest always passes its own floor
    for n in reversed(budgets[0][:-1]):
        if n not in passing:
            break
        chosen = n
    return chosen


def at_budget(metrics: dict, serving: dict | None, fold: str) -> dict:
    """`fold`'s two-stage metrics (evaluated at 200 candidates) with those at K=10 replaced by the
    chosen budget's, measured by `tune_candidate_budget`: what a k=10 request is served. Metrics
    at deeper cut-offs stay: a request for k items ranks at least k candidates."""
    serving = serving or {}
    record, chosen = serving.get("candidate_budget") or {}, serving.get("n_candidates")
    row = next((r for r in record.get(fold, []) if r["n_candidates"] == chosen), None)
    if row is None:
        return metrics
    return {**metrics, **{m: row[m] for m in ("ndcg@10", "recall@10", "hr@10", "mrr@10")}}


def tune_candidate_budget(path: Path, dataset: Dataset, config: GateConfig, threads: int = 1) -> dict:
    """Choose the compressed artifact's budget on validation, score it on test, and record both
    in its manifest as `serving` ({"n_candidates": N, "candidate_budget": what was measured}).

    Args:
        path: an artifact holding the selection fold's models ("selection/", scored on
            validation) and the served ones (scored on test).
        threads: ONNX Runtime intra-op threads.
    Returns:
        The `serving` record written; with no budgets configured, the default (200) is kept
        and nothing is written.
    """
    budgets = config.candidate_budgets
    if not budgets:
        return {}
    t0 = time.perf_counter()
    artifact = load_artifact(path)
    selection = ServedModel(artifact, SELECTION_PREFIX, threads)
    valid, valid_new = known_and_new(selection, dataset, VALID, budgets)
    # One model at a time: a ranker session's arena holds ~400 MiB at 256 users x 200 candidates.
    del selection
    chosen = choose_budget([valid, valid_new], config.candidate_tolerance)
    reference = max(budgets)
    served = ServedModel(artifact, SERVED_PREFIX, threads)
    test, test_new = known_and_new(served, dataset, TEST, (reference, chosen))
    record = {
        "n_candidates": chosen,
        "candidate_budget": {
            "chosen_on": f"validation two-stage NDCG@10 of the {SELECTION_PREFIX} models (PROTOCOL.md), "
            "users known and sent as new users (history only)",
            "rule": f"smallest budget which, with every larger one, has NDCG@10 >= the {reference}-candidate "
            "figure x (1 - tolerance), known and new users alike",
            "tolerance": config.candidate_tolerance,
            "reference": reference,
            "valid": valid,
            "test": test,
            "valid_history_only": valid_new,
            "test_history_only": test_new,
            "seconds": time.perf_counter() - t0,
        },
    }
    amend_artifact(path, fields={"serving": record})
    for fold, rows in (
        ("valid", valid),
        ("valid new users", valid_new),
        ("test", test),
        ("test new users", test_new),
    ):
        for r in rows:
            log(
                f"candidate budget {r['n_candidates']:>4}: {fold} two-stage NDCG@10 {r['ndcg@10']:.4f} "
                f"(change {r['ndcg@10_change']:+.4f} +- {r['ndcg@10_change_se']:.4f} SE)"
            )
    log(f"candidate budget: {chosen} (tolerance {config.candidate_tolerance:g} of the {reference} figure)")
    return record
