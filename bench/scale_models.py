"""The model side of the scale benchmark: train briefly, tune the compressed index, write artifacts.

Helpers of bench/scale.py, imported when a size is built (they pull in torch). The student goes
through the compression pipeline's own stages and index tuner (compression/pipeline.py,
compression/tune_index.py), with the scale run's settings.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
from slimrec.bench.progress import Clock, log
from slimrec.bench.scale_config import ScaleConfig
from slimrec.compression.tune_index import K


def training_view(fold, n_rows: int | None, rng: np.random.Generator):
    """`fold`, but one epoch over a random sample of its fitted rows.

    The id tables, features, counts and popularity stay those of all fitted rows (they are
    computed first, then the copy's `fit_positions` is replaced), so every fitted item keeps
    its own id row; only which rows a retrieval epoch visits changes.
    """
    for name in ("tables", "user_features", "fit_counts", "item_popularity", "item_codes"):
        getattr(fold, name)
    view = copy.copy(fold)
    if n_rows is not None and n_rows < len(fold.fit_positions):
        view.__dict__["fit_positions"] = np.sort(rng.choice(fold.fit_positions, n_rows, replace=False))
    return view


def train_models(fold, sample, train_config, config: ScaleConfig, clock: Clock):
    """Teacher (retrieval on `sample`, ranker on `fold`), then the compression pipeline's stages on a
    student: distilled from it (its ranker over its own candidates), its rare ids on the shared row
    (`config.embedding_min_count`), its embedding tables int8. One epoch per model. Returns
    (teacher, student) as FoldModels, their blend weights still to choose (`choose_retrieval_weight_`)."""
    from slimrec.compression.pipeline import PipelineConfig, distill_stage, prune_stage_, quantize_stage_
    from slimrec.compression.prune import PruneConfig
    from slimrec.models.train import FoldModels, train_ranker, train_retrieval

    w = config.retrieval_weights[0]  # a placeholder: `choose_retrieval_weight_` sets each variant's
    retrieval = train_retrieval(sample, train_config, epochs=1)
    clock.lap("teacher_retrieval")
    ranking = train_ranker(fold, retrieval.model, train_config, epochs=1, retrieval_weights=(w,))
    clock.lap("teacher_ranker")
    teacher = FoldModels(fold, retrieval.model, ranking.model, w, retrieval, ranking)

    student = distill_stage(
        (retrieval.model, ranking.model),
        fold,
        train_config,
        config.distill_config(),
        epochs=(1, 1),
        weights=(w,),
        retrieval_fold=sample,
        lap=clock.lap,
    )
    if config.embedding_min_count:  # rows only: no hidden-unit pruning without a fine-tuning pass
        prune_stage_(
            student,
            PruneConfig(
                keep_fraction=1.0, prune_cross_rank=False, embedding_min_count=config.embedding_min_count
            ),
        )
    quantize_stage_(student, PipelineConfig().embeddings)
    return teacher, student


def choose_retrieval_weight_(models, users: np.ndarray, weights: tuple[float, ...]) -> dict:
    """Set `models.retrieval_weight` to the blend weight with the best two-stage NDCG@10 on
    `users` (test users of `models.fold`, disjoint from those the sanity check reports on), over
    exact retrieval of K candidates. Returns {"chosen": weight, "ndcg@10_by_weight": {...}}."""
    from slimrec.models.evaluate import evaluate_ranked, retrieve_candidates

    rows = np.searchsorted(models.fold.eval_users, users)  # eval_users is sorted
    candidates = retrieve_candidates(models.two_tower, models.fold, K, rows)
    by_weight = {
        w: metrics["ndcg@10"]
        for w, metrics in evaluate_ranked(models.ranker, models.fold, candidates, weights, rows).items()
    }
    models.retrieval_weight = max(by_weight, key=lambda w: by_weight[w])
    return {"chosen": models.retrieval_weight, "ndcg@10_by_weight": {str(w): v for w, v in by_weight.items()}}


def stage_summary(result) -> dict:
    return {
        "seconds": round(result.seconds, 2),
        "epochs": result.epochs,
        "loss": [round(h["loss"], 4) for h in result.history if "loss" in h],
        "examples_per_s": [round(h["examples_per_s"]) for h in result.history if "examples_per_s" in h],
    }


def shape_summary(dataset, fold, sample, student) -> dict:
    """build.json's "shape": the catalogue, what was fitted, and the id rows the student kept."""
    from slimrec.compression.prune_embeddings import embedding_rows

    return {
        "n_items": dataset.n_items,
        "n_users": dataset.n_users,
        "interactions": len(dataset.interactions),
        "fitted_interactions": int(len(fold.fit_positions)),
        "items_with_fitted_interactions": int((fold.item_popularity > 0).sum()),
        "retrieval_epoch_interactions": int(len(sample.fit_positions)),
        "items_in_retrieval_epoch": int(len(np.unique(fold.split.item[sample.fit_positions]))),
        "compressed_id_rows": {
            **embedding_rows(student.two_tower),
            **{f"ranker.{k}": v for k, v in embedding_rows(student.ranker).items()},
        },
    }


def build_indexes(teacher, student, fold, tune_users: np.ndarray, config: ScaleConfig, clock: Clock):
    """Time the full model's exact index build; build the student's IVF index and tune its nprobe
    on `tune_users` (`tune_index`, as `slimrec compress` does, ties within `config.recall_tolerance`).

    Returns (IndexSpec of the compressed index, build.json's "index" entry).
    """
    from slimrec.artifact.index import IndexSpec, build_item_index
    from slimrec.compression.tune_index import tune_index
    from slimrec.models.evaluate import item_embeddings

    t0 = time.perf_counter()
    build_item_index(item_embeddings(teacher.two_tower, fold.dataset.n_items), IndexSpec("flat"))
    flat_seconds = time.perf_counter() - t0
    clock.lap("index_full")
    tuned = tune_index(
        student,
        config.index_tuning(),
        users=tune_users,
        seed=config.seed,
        recall_tolerance=config.recall_tolerance,
    )
    clock.lap("index_compressed_tune")
    return tuned.spec, {
        "full": {"kind": "flat", "build_seconds": flat_seconds},
        "compressed": {
            **tuned.spec.to_dict(),
            "build_seconds": tuned.build_seconds,
            "tuning": tuned.curve,
            "target_recall": config.target_recall,
            "tuning_users": len(tune_users),
        },
    }


def write_served(out: Path, variant: str, models, spec, dense_quant, data: dict, config: dict) -> None:
    """An artifact holding only the served model (prefix ""); `write_fitted_artifact` would also
    write a selection twin, which nothing at scale scores."""
    from slimrec.artifact import ArtifactWriter
    from slimrec.models.package import SERVED_PREFIX, model_entry, write_catalogue, write_model

    writer = ArtifactWriter(out, variant, config={}, data=data)
    try:
        entry = {
            **model_entry(models, spec),
            **write_model(
                writer, SERVED_PREFIX, models.fold, models.two_tower, models.ranker, spec, dense_quant
            ),
        }
        write_catalogue(writer, models.fold)
        writer.set(
            "config",
            {**config, "feature_space": models.fold.space.to_dict(), "models": {SERVED_PREFIX: entry}},
        )
        writer.commit()
    except BaseException:
        writer.abort()
        raise


def choose_candidate_budget_(path: Path, dataset, split, users: np.ndarray, threads: int) -> dict:
    """The compressed artifact's ranker candidate budget, chosen by `slimrec compress`'s rule
    (compression/tune_candidates.py: walk down from the largest budget while two-stage NDCG@10,
    users known and sent as new users, stays within the gate's candidate tolerance) on `users`
    (tuning users' test items: nothing is fitted on train alone at scale), and written to its
    manifest (`serving.n_candidates`, what the server ranks). Returns build.json's entry."""
    from slimrec.artifact import amend_artifact, load_artifact
    from slimrec.artifact.runtime import ServedModel
    from slimrec.compression.gate import GateConfig
    from slimrec.compression.tune_candidates import budget_rows, choose_budget
    from slimrec.models.served_eval import fold_items
    from slimrec.models.split import TEST

    gate = GateConfig()
    model = ServedModel(load_artifact(path), threads=threads)
    relevant = fold_items(split, dataset.n_users, TEST, users)
    row_sets = [budget_rows(model, users, relevant, gate.candidate_budgets, new) for new in (False, True)]
    del model
    chosen = choose_budget(row_sets, gate.candidate_tolerance)
    record = {
        "chosen_on": "two-stage NDCG@10 of the scale bench's tuning users (test items), known and new",
        "tolerance": gate.candidate_tolerance,
        "known": row_sets[0],
        "new_users": row_sets[1],
    }
    amend_artifact(path, fields={"serving": {"n_candidates": chosen, "candidate_budget": record}})
    log(
        f"candidate budget {chosen} (tuning users' NDCG@10 known / new by budget: "
        + ", ".join(
            f"{k['n_candidates']}: {k['ndcg@10']:.4f} / {n['ndcg@10']:.4f}"
            for k, n in zip(*row_sets, strict=True)
        )
        + ")"
    )
    return {"chosen": chosen, **record}


def served_checks(work: Path, dataset, split, users: np.ndarray, threads: int, tolerance: float) -> dict:
    """Through the written artifacts, on held-out test users: the compressed index's recall@K
    against exact search over its own item vectors, and (sanity, not PROTOCOL) two-stage
    recall@10 of both variants, each at its served candidate budget, next to popularity."""
    from slimrec.artifact import load_artifact
    from slimrec.artifact.index import IndexSpec, build_item_index, recall_at_k, recall_within
    from slimrec.artifact.runtime import ServedModel
    from slimrec.models.ranking_metrics import ranking_metrics
    from slimrec.models.served_eval import fold_items, item_vectors
    from slimrec.models.split import TEST

    relevant = fold_items(split, dataset.n_users, TEST, users)
    out = {"sanity_recall@10": {}, "sanity_users": int(len(users))}
    for variant in ("full", "compressed"):
        model = ServedModel(load_artifact(work / variant), threads=threads)
        tops = [
            model.recommend(model.known_users(users[s : s + 100]), k=10).items  # its served budget
            for s in range(0, len(users), 100)
        ]
        metrics = ranking_metrics(np.concatenate(tops), *relevant, ks=(10,))
        out["sanity_recall@10"][variant] = metrics["recall@10"]
        if variant == "compressed":
            queries = model.embed(model.known_users(users, exclude_seen=False))
            vectors = item_vectors(model)
            exact_scores, exact = build_item_index(vectors, IndexSpec("flat")).search(queries, K)
            found = model.index.search(queries, K)[1]
            out["index_recall@200"] = recall_within(found, exact_scores, queries, vectors, tolerance)
            out["index_recall@200_strict"] = recall_at_k(found, exact)
            out["sanity_recall@10"]["popularity"] = popularity_recall(model, users, relevant)
        del model
    log(
        f"index recall@{K} vs exact {out['index_recall@200']:.4f} "
        f"(strict {out['index_recall@200_strict']:.4f}); sanity two-stage recall@10 "
        + ", ".join(f"{k} {v:.4f}" for k, v in out["sanity_recall@10"].items())
    )
    return out


def popularity_recall(model, users: np.ndarray, relevant) -> float:
    """recall@10 of the served popularity fallback (most-interacted unseen items) for `users`."""
    from slimrec.models.ranking_metrics import ranking_metrics

    batch = model.known_users(users)
    top = np.full((len(users), 10), -1)
    for j in range(len(users)):
        seen = batch.exclude_items[batch.exclude_indptr[j] : batch.exclude_indptr[j + 1]]
        items = model.popular(10, exclude=seen)
        top[j, : len(items)] = items
    return ranking_metrics(top, *relevant, ks=(10,))["recall@10"]
