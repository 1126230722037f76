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

import numpy as np

from compression.artifact import Artifact, ArtifactError, load_artifact
from compression.runtime import ServedModel

CATALOGUE = "catalogue.json"


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

    def describe(self) -> dict:
        """What `GET /v1/variants` says about this variant: version, path, manifest summary."""
        return {"name": self.name, "path": str(self.path), "model_version": self.version,
                "loaded_at": self.loaded_at, "n_users": len(self.user_index),
                "n_items": len(self.item_ids), "genres": sorted(self.genre_masks),
                "summary": self.artifact.summary()}


def model_version(artifact: Artifact) -> str:
    """A content address: the artifact's variant plus a digest of every file's sha256.

    Two directories holding the same files have the same version; changing any file
    (weights, index, metrics) changes it.

    Example:
        >>> model_version(load_artifact("artifacts/teacher"))
        'full-3f2a9c1d0b7e'
    """
    files = json.dumps({rel: entry["sha256"] for rel, entry in artifact.files.items()}, sort_keys=True)
    return f"{artifact.variant}-{hashlib.sha256(files.encode()).hexdigest()[:12]}"


def load_variant(name: str, path: str | Path, ort_threads: int = 1) -> Variant:
    """Verify and load an artifact for serving, then run a smoke query through it.

    Args:
        name: the variant name it is served under ("full", "compressed", ...).
        path: artifact directory; its manifest and the sha256 of every file are checked.
        ort_threads: ONNX Runtime intra-op threads per session.

    Returns:
        The loaded Variant.

    Raises:
        ArtifactError: the manifest, a file, the catalogue or the smoke query is wrong
            (the message names the file or the check).

    Example:
        >>> variant = load_variant("full", "artifacts/teacher")
        >>> variant.item_ids[:3]
        ['1', '2', '3']
    """
    path = Path(path)
    artifact = load_artifact(path)  # format version + sha256 of every listed file
    model = ServedModel(artifact, "", threads=ort_threads)
    catalogue = artifact.read_json(CATALOGUE)
    item_ids = [str(i) for i in catalogue["item_ids"]]
    user_ids = [str(u) for u in catalogue["user_ids"]]
    if len(item_ids) != model.n_items or len(user_ids) != model.n_users:
        raise ArtifactError(f"{artifact.file(CATALOGUE)}: {len(user_ids)} users / {len(item_ids)} items, "
                            f"the model has {model.n_users} / {model.n_items}")
    variant = Variant(
        name=name, path=path.resolve(), artifact=artifact, model=model, version=model_version(artifact),
        user_index={u: i for i, u in enumerate(user_ids)},
        item_index={it: i for i, it in enumerate(item_ids)},
        item_ids=item_ids, titles=[str(t) for t in catalogue["titles"]],
        genre_masks=genre_masks(catalogue["genres"]),
    )
    smoke_test(variant)
    return variant


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
    recs = model.recommend(model.known_users(np.array([0])), min(k, model.n_items))
    items, scores = recs.items[0], recs.scores[0]
    valid = items >= 0
    if not valid.any() or items.max() >= model.n_items or not np.isfinite(scores[valid]).all():
        raise ArtifactError(f"{variant.path}: smoke query returned invalid items or scores "
                            f"(items {items.tolist()}, scores {scores.tolist()})")
    popular = model.popular(k)
    if len(popular) == 0 or popular.max() >= model.n_items:
        raise ArtifactError(f"{variant.path}: popularity fallback table is empty or out of range")
