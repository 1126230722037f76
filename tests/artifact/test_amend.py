"""artifact/amend.py: metrics and files added to an existing artifact keep it verifiable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from slimrec.artifact import ArtifactError, ArtifactWriter, load_artifact, update_metrics
from slimrec.artifact.manifest import MANIFEST

CONFIG = {"model": "two_tower", "dim": 8, "lr": 0.01}
DATA = {"dataset": "ml-100k", "fingerprint": "abc123"}


def write_sample(directory: Path, variant: str = "full") -> dict[str, np.ndarray]:
    """Write a small artifact with json, tensors and raw bytes; return the tensors."""
    rng = np.random.default_rng(0)
    tensors = {
        "item_emb": rng.standard_normal((5, 8)).astype(np.float32),
        "user_emb": rng.standard_normal((3, 8)).astype(np.float16),
        "item_index": np.arange(5, dtype=np.int64),
    }
    with ArtifactWriter(directory, variant, CONFIG, DATA) as writer:
        writer.write_json("item_ids.json", ["1", "2", "50", "172", "181"])
        writer.write_tensors("weights.safetensors", tensors, metadata={"note": "test"})
        writer.write_bytes("blobs/model.bin", b"\x00\x01\x02onnx-ish")
        writer.write_json("train_log.json", {"epochs": 3})
        writer.set_role("train_log.json", "offline")
        writer.set("promotable", True)
        writer.set("extra", {"quantization": "none"})
    return tensors


def manifest_of(directory: Path) -> dict:
    return json.loads((directory / MANIFEST).read_text())


def rewrite_manifest(directory: Path, **changes) -> None:
    manifest = manifest_of(directory)
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# --- round trip ------------------------------------------------------------------------------------


# --- metrics ----------------------------------------------------------------------------------------


def test_update_metrics_keeps_verification_passing(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    served_before = load_artifact(out).served_bytes()

    update_metrics(out, {"recall@10": np.float32(0.5), "ndcg@10": 0.3})
    update_metrics(out, {"recall@10": 0.25, "ndcg@10": 0.125})  # re-evaluation overwrites

    artifact = load_artifact(out)
    assert artifact.read_json("metrics.json") == {"recall@10": 0.25, "ndcg@10": 0.125}
    assert artifact.manifest["files"]["metrics.json"]["role"] == "offline"
    assert artifact.served_bytes() == served_before
    assert leftovers(out) == []


def test_tampering_with_metrics_after_update_is_caught(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    update_metrics(out, {"recall@10": 0.25})
    metrics = out / "metrics.json"
    metrics.write_bytes(metrics.read_bytes().replace(b"0.25", b"0.99"))  # same size, better numbers

    with pytest.raises(ArtifactError, match=r"metrics\.json.*checksum mismatch"):
        load_artifact(out)


def test_update_metrics_refuses_a_non_artifact(tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(ArtifactError, match="missing"):
        update_metrics(tmp_path / "art", {"recall@10": 0.1})
