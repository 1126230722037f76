"""A served variant: a verified artifact, its model, its id maps and item metadata, loaded as one unit.

Loading is blocking (checksums, ONNX sessions, FAISS); the app calls it from a worker thread.
Nothing on a `Variant` changes after loading, so a reload builds a new one beside the old
one and swaps the reference: requests hold whichever they picked up, start to finish.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from slimrec.artifact import Artifact, ArtifactError, load_artifact
from slimrec.artifact.runtime import ServedModel

CATALOGUE = "catalogue.json"
# What serving feeds each graph (slimrec.artifact.runtime): input name -> rank; all int64.
USER_TOWER_INPUTS = {"user_code": 1, "user_features": 2, "history": 2}
RANKER_INPUTS = {**USER_TOWER_INPUTS, "candidates": 2}
FLOAT_TYPES = ("tensor(float)", "tensor(float16)", "tensor(double)")


@dataclass
class Variant:
    """Everything a request needs from one loaded artifact (read-only after `load_variant`)."""

    name: str
    path: Path
    artifact: Artifact
    model: ServedModel
    version: str
    user_index: dict[str, int]  # raw user id -> user index
    item_index: dict[str, int]  # raw item id -> item index
    item_ids: list[str]  # item index -> raw id
    titles: list[str]
    genre_masks: dict[str, np.ndarray]  # genre -> bool [n_items], precomputed for filters
    loaded_at: float = field(default_factory=time.time)
    # The ranker's candidate budget (index top-N per request) and where it comes from: the
    # artifact's (chosen on validation by `slimrec compress`), the default 200 for an artifact
    # without one, or the server's `n_candidates` setting, which overrides both.
    n_candidates: int = 200
    n_candidates_from: Literal["artifact", "default", "settings"] = "default"

    def describe(self) -> dict:
        """What `GET /v1/variants` says about this variant: version, path, manifest summary."""
        return {
            "name": self.name,
            "path": str(self.path),
            "model_version": self.version,
            "loaded_at": self.loaded_at,
            "n_users": len(self.user_index),
            "n_items": len(self.item_ids),
            "genres": sorted(self.genre_masks),
            "n_candidates": self.n_candidates,
            "n_candidates_from": self.n_candidates_from,
            "summary": self.artifact.summary(),
        }


def model_version(artifact: Artifact) -> str:
    """A content address: the artifact's variant plus a digest of its served files' sha256.

    Two directories serving the same files have the same version; changing a served file
    (a graph, the index, the tables) changes it, while re-evaluating the model (metrics.json,
    the report and other offline files) does not.

    Example:
        >>> model_version(load_artifact("artifacts/teacher"))
        'full-3f2a9c1d0b7e'
    """
    served = {rel: entry["sha256"] for rel, entry in artifact.files.items() if entry["role"] == "served"}
    files = json.dumps(served, sort_keys=True)
    return f"{artifact.variant}-{hashlib.sha256(files.encode()).hexdigest()[:12]}"


def load_variant(
    name: str, path: str | Path, ort_threads: int = 1, *, cache_known_users: bool = False
) -> Variant:
    """Verify and load an artifact for serving, then run a smoke query through it.

    Args:
        name: the variant name it is served under ("full", "compressed", ...).
        path: artifact directory; its manifest and the sha256 of every file are checked.
        ort_threads: ONNX Runtime intra-op threads per session.
        cache_known_users: compute known users' embeddings and retrieval candidates now
            (`ServedModel.cache_user_embeddings`, `cache_user_candidates`): for a copy that
            runs batches (in process, a model process, a Ray model replica), not for one that
            only checks requests and answers the popularity fallback (the `--model-process`
            parent, a Ray ingress).

    Returns:
        The loaded Variant.

    Raises:
        ArtifactError: the manifest, a file (checksum, size, format version), a graph's
            signature, a table's shape, the catalogue or the smoke query is wrong (the message
            names the file and the problem).

    Example:
        >>> variant = load_variant("full", "artifacts/teacher")
        >>> variant.item_ids[:3]
        ['1', '2', '3']
    """
    path = Path(path)
    artifact = load_artifact(path)  # format version + sha256 of every listed file
    model = ServedModel(artifact, "", threads=ort_threads)
    check_signatures(model)
    check_tables(model)
    catalogue = artifact.read_json(CATALOGUE)
    item_ids = [str(i) for i in catalogue["item_ids"]]
    user_ids = [str(u) for u in catalogue["user_ids"]]
    if len(item_ids) != model.n_items or len(user_ids) != model.n_users:
        raise ArtifactError(
            f"{artifact.file(CATALOGUE)}: {len(user_ids)} users / {len(item_ids)} items, "
            f"the model has {model.n_users} / {model.n_items}"
        )
    variant = Variant(
        name=name,
        path=path.resolve(),
        artifact=artifact,
        model=model,
        version=model_version(artifact),
        user_index={u: i for i, u in enumerate(user_ids)},
        item_index={it: i for i, it in enumerate(item_ids)},
        item_ids=item_ids,
        titles=[str(t) for t in catalogue["titles"]],
        genre_masks=genre_masks(catalogue["genres"]),
        n_candidates=model.n_candidates,
        n_candidates_from=model.n_candidates_from,
    )
    smoke_test(variant)
    if cache_known_users:  # after the smoke test, which checked the tower's output shape
        model.cache_user_embeddings()
        model.cache_user_candidates()
    return variant


def check_signatures(model: ServedModel) -> None:
    """The ONNX graphs take what serving feeds them and return what it expects, or ArtifactError.

    user_tower: inputs among user_code [B], user_features [B, F], history [B, N] (int64; an exporter
    may drop an unused one) -> float [B, D] with D = the index's dimension. ranker: the same plus
    candidates [B, C] (required) -> float [B, C]. Fixed dimensions must match the feature space.

    Example:
        >>> check_signatures(ServedModel(load_artifact("artifacts/teacher")))  # None: it fits
    """
    fixed = {"user_features": model.user_features.shape[1], "history": model.space.history_len}
    prefix = model.prefix
    _check_graph(
        model.artifact.file(f"{prefix}user_tower.onnx"),
        model.user_tower,
        USER_TOWER_INPUTS,
        required=(),
        out_dim=model.index.dim,
        fixed=fixed,
        out_what=f"the index dimension ({model.index.dim}, items.faiss)",
    )
    _check_graph(
        model.artifact.file(f"{prefix}ranker.onnx"),
        model.ranker,
        RANKER_INPUTS,
        required=("candidates",),
        out_dim=None,
        fixed=fixed,
        out_what="",
    )


def _check_graph(
    path: Path,
    session,
    expected: dict[str, int],
    required: tuple[str, ...],
    out_dim: int | None,
    fixed: dict[str, int],
    out_what: str,
) -> None:
    def fail(problem: str) -> None:
        raise ArtifactError(f"{path}: {problem}")

    inputs = {i.name: i for i in session.get_inputs()}
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        fail(
            f"input(s) {', '.join(map(repr, unknown))} are not ones serving provides ({', '.join(expected)})"
        )
    missing = [name for name in required if name not in inputs]
    if missing or not inputs:
        fail(f"missing input(s) {', '.join(map(repr, missing or list(expected)))}")
    for name, node in inputs.items():
        if node.type != "tensor(int64)":
            fail(f"input {name!r} is {node.type}, serving feeds tensor(int64)")
        if len(node.shape) != expected[name]:
            fail(f"input {name!r} has shape {node.shape}, serving feeds rank {expected[name]}")
        if name in fixed and isinstance(node.shape[1], int) and node.shape[1] != fixed[name]:
            fail(f"input {name!r} has shape {node.shape}, serving feeds [batch, {fixed[name]}]")
    output = session.get_outputs()[0]
    if output.type not in FLOAT_TYPES or len(output.shape) != 2:
        fail(f"output {output.name!r} is {output.type} {output.shape}, serving expects a float [batch, N]")
    if out_dim is not None and isinstance(output.shape[1], int) and output.shape[1] != out_dim:
        fail(f"output {output.name!r} has shape {output.shape}, its last dimension must be {out_what}")


def check_tables(model: ServedModel) -> None:
    """Lookup tables (tables.safetensors) sized and ranged for the catalogue, or ArtifactError.

    A wrong table would not fail the smoke query, only some users' requests at run time.
    """
    path = model.artifact.file(f"{model.prefix}tables.safetensors")
    n_users, n_items = model.n_users, model.n_items
    indptr, items = model.fitted_indptr, model.fitted_items
    problems = []
    if model.user_features.ndim != 2 or model.user_features.shape[0] != n_users + 1:
        problems.append(f"user_features has shape {model.user_features.shape}, expected [{n_users + 1}, F]")
    if (
        indptr.shape != (n_users + 1,)
        or indptr[0] != 0
        or (np.diff(indptr) < 0).any()
        or indptr[-1] != len(items)
    ):
        problems.append(f"fitted_indptr is not a CSR row pointer for {n_users} users over {len(items)} items")
    if len(items) and (items.min() < 0 or items.max() >= n_items):
        problems.append(f"fitted_items holds indices outside [0, {n_items})")
    popular = model.popular_items
    if popular.ndim != 1 or (len(popular) and (popular.min() < 0 or popular.max() >= n_items)):
        problems.append(f"popular_items holds indices outside [0, {n_items})")
    if problems:
        raise ArtifactError(f"{path}: {'; '.join(problems)}")


def genre_masks(genres: list[str]) -> dict[str, np.ndarray]:
    """genre -> bool [n_items] from "|"-joined genre strings (empty names skipped)."""
    split = [set(filter(None, str(g).split("|"))) for g in genres]
    names = sorted(set().union(*split)) if split else []
    return {name: np.fromiter((name in s for s in split), bool, len(split)) for name in names}


def smoke_test(variant: Variant, k: int = 10) -> None:
    """One real query through the served path; raises ArtifactError if the answer is malformed."""
    model = variant.model
    if model.n_users == 0 or model.n_items == 0:
        raise ArtifactError(f"{variant.path}: smoke query impossible, the catalogue is empty")
    batch = model.known_users(np.array([0]))
    embedding = model.embed(batch)
    if embedding.shape != (1, model.index.dim):  # a symbolic output dimension is only known now
        raise ArtifactError(
            f"{model.artifact.file(f'{model.prefix}user_tower.onnx')}: user embedding has "
            f"shape {list(embedding.shape)} for one user, the index (items.faiss) "
            f"expects [1, {model.index.dim}]"
        )
    recs = model.recommend(batch, min(k, model.n_items))
    items, scores = recs.items[0], recs.scores[0]
    valid = items >= 0
    if not valid.any() or items.max() >= model.n_items or not np.isfinite(scores[valid]).all():
        raise ArtifactError(
            f"{variant.path}: smoke query returned invalid items or scores "
            f"(items {items.tolist()}, scores {scores.tolist()})"
        )
    popular = model.popular(k)
    if len(popular) == 0 or popular.max() >= model.n_items:
        raise ArtifactError(f"{variant.path}: popularity fallback table is empty or out of range")
