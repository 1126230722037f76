"""artifact/writer.py: all-or-nothing artifact directories, paths kept inside them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from slimrec.artifact import ArtifactError, ArtifactWriter, load_artifact, sha256_file
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
def test_round_trip_preserves_files_and_manifest(tmp_path):
    out = tmp_path / "art"
    tensors = write_sample(out)

    artifact = load_artifact(out)

    assert artifact.variant == "full"
    assert artifact.config == CONFIG
    assert artifact.read_json("item_ids.json") == ["1", "2", "50", "172", "181"]
    loaded = artifact.read_tensors("weights.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype
        np.testing.assert_array_equal(loaded[name], array)
    assert artifact.file("blobs/model.bin").read_bytes() == b"\x00\x01\x02onnx-ish"

    m = artifact.manifest
    assert m["format"] == "slimrec-artifact" and m["format_version"] == 1
    assert m["data"] == {**DATA, "split": "PROTOCOL.md"}
    assert m["promotable"] is True and m["extra"] == {"quantization": "none"}
    assert m["created_at"].endswith("Z")
    assert set(m["versions"]) == {"python", "torch", "onnxruntime", "faiss", "numpy"}
    assert m["versions"]["numpy"] == np.__version__
    assert set(m["files"]) == {"item_ids.json", "weights.safetensors", "blobs/model.bin", "train_log.json"}
    assert m["files"]["train_log.json"]["role"] == "offline"
    assert m["files"]["weights.safetensors"]["sha256"] == sha256_file(out / "weights.safetensors")
    assert leftovers(tmp_path) == []


def test_non_contiguous_arrays_are_written_in_logical_order(tmp_path):
    # safetensors.numpy dumps the raw buffer; a transposed view must not come back scrambled.
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    views = {"transposed": base.T, "strided": base[:, ::2]}
    with ArtifactWriter(tmp_path / "art", "full", CONFIG, DATA) as writer:
        writer.write_tensors("w.safetensors", views)

    loaded = load_artifact(tmp_path / "art").read_tensors("w.safetensors")
    for name, view in views.items():
        np.testing.assert_array_equal(loaded[name], view)


def test_writer_refuses_paths_escaping_the_directory(tmp_path):
    writer = ArtifactWriter(tmp_path / "art", "full", CONFIG, DATA)
    for evil in ["../evil", "/abs", "manifest.json"]:
        with pytest.raises(ArtifactError):
            writer.write_bytes(evil, b"x")
    writer.abort()
    assert list(tmp_path.iterdir()) == []


# --- atomic commit ----------------------------------------------------------------------------------


def test_exception_inside_context_leaves_nothing_behind(tmp_path):
    out = tmp_path / "art"
    with pytest.raises(RuntimeError, match="training diverged"):
        with ArtifactWriter(out, "full", CONFIG, DATA) as writer:
            writer.write_json("item_ids.json", ["1"])
            raise RuntimeError("training diverged")

    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_failed_rewrite_keeps_the_old_artifact(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    with pytest.raises(RuntimeError):
        with ArtifactWriter(out, "compressed", CONFIG, DATA) as writer:
            writer.write_json("item_ids.json", ["9"])
            raise RuntimeError("boom")

    assert load_artifact(out).variant == "full"
    assert leftovers(tmp_path) == []


def test_rewriting_an_existing_artifact_replaces_it(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    with ArtifactWriter(out, "compressed", CONFIG, DATA) as writer:
        writer.write_json("only.json", {"v": 2})

    artifact = load_artifact(out)
    assert artifact.variant == "compressed"
    assert set(artifact.manifest["files"]) == {"only.json"}
    assert not (out / "weights.safetensors").exists()  # old files gone, not merged
    assert leftovers(tmp_path) == []


def test_writer_refuses_to_replace_a_non_artifact_directory(tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")

    with pytest.raises(ArtifactError, match="not an artifact directory"):
        ArtifactWriter(precious, "full", CONFIG, DATA)
    assert (precious / "thesis.tex").exists()


def test_writer_rejects_computed_fields_and_unwritten_roles(tmp_path):
    writer = ArtifactWriter(tmp_path / "art", "full", CONFIG, DATA)
    with pytest.raises(ArtifactError, match="computed"):
        writer.set("files", {})
    with pytest.raises(ArtifactError, match="promotable"):
        writer.set("promotable", "yes")
    writer.set_role("never.json", "offline")
    with pytest.raises(ArtifactError, match="never written"):
        writer.commit()
    assert list(tmp_path.iterdir()) == []
