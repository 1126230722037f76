"""artifact/load.py and manifest.py: a loaded artifact is a verified one; every problem names its file."""

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


def test_served_bytes_counts_only_served_files(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    artifact = load_artifact(out)

    served = ["item_ids.json", "weights.safetensors", "blobs/model.bin"]
    assert artifact.served_bytes() == sum((out / rel).stat().st_size for rel in served)
    assert artifact.total_bytes() == artifact.served_bytes() + (out / "train_log.json").stat().st_size


def test_summary_has_sizes_and_metrics_once_evaluated(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    summary = load_artifact(out).summary()
    assert summary["variant"] == "full" and summary["promotable"] is True
    assert summary["sizes"]["served_bytes"] == load_artifact(out).served_bytes()
    assert "metrics" not in summary

    update_metrics(out, {"recall@10": 0.25})
    assert load_artifact(out).summary()["metrics"] == {"recall@10": 0.25}


def test_unlisted_extra_files_are_ignored(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    (out / "notes.txt").write_text("scratch")

    artifact = load_artifact(out)
    assert "notes.txt" not in artifact.manifest["files"]
    with pytest.raises(ArtifactError, match="not listed"):
        artifact.file("notes.txt")


# --- verification failures ------------------------------------------------------------------------


def test_tampered_file_is_a_checksum_mismatch_naming_the_file(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    target = out / "weights.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    target.write_bytes(bytes(data))

    with pytest.raises(ArtifactError, match=r"weights\.safetensors.*checksum mismatch"):
        load_artifact(out)
    load_artifact(out, verify=False)  # sizes still match, so only hashing catches it


def test_truncated_file_is_a_size_mismatch(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    target = out / "blobs" / "model.bin"
    target.write_bytes(target.read_bytes()[:-3])

    with pytest.raises(ArtifactError, match=r"model\.bin.*size mismatch \(truncated\)"):
        load_artifact(out)
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(out, verify=False)


def test_missing_file_is_refused(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    (out / "item_ids.json").unlink()

    with pytest.raises(ArtifactError, match=r"item_ids\.json.*missing"):
        load_artifact(out)


def test_missing_manifest_is_refused(tmp_path):
    (tmp_path / "art").mkdir()
    with pytest.raises(ArtifactError, match=r"manifest\.json.*missing"):
        load_artifact(tmp_path / "art")


def test_invalid_json_manifest_is_refused(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    (out / MANIFEST).write_text('{"format": "slimrec-artifact", ')

    with pytest.raises(ArtifactError, match=r"manifest\.json.*not valid JSON"):
        load_artifact(out)


def test_wrong_format_is_refused(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    rewrite_manifest(out, format="something-else")

    with pytest.raises(ArtifactError, match="format is 'something-else'"):
        load_artifact(out)


def test_unknown_format_version_names_supported_versions(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    rewrite_manifest(out, format_version=2)

    with pytest.raises(ArtifactError, match=r"unsupported format_version 2.*reads 1"):
        load_artifact(out)


@pytest.mark.parametrize("evil", ["../evil", "sub/../../evil", "/etc/passwd", "C:\\evil", "./item_ids.json"])
def test_manifest_paths_escaping_the_directory_are_refused(tmp_path, evil):
    out = tmp_path / "art"
    write_sample(out)
    (tmp_path / "evil").write_text("outside")
    manifest = manifest_of(out)
    manifest["files"][evil] = dict(manifest["files"]["item_ids.json"])
    (out / MANIFEST).write_text(json.dumps(manifest))

    with pytest.raises(ArtifactError, match=r"manifest\.json.*files"):
        load_artifact(out, verify=False)


def test_symlink_escaping_the_directory_is_refused(tmp_path):
    out = tmp_path / "art"
    write_sample(out)
    outside = tmp_path / "outside.json"
    outside.write_bytes((out / "item_ids.json").read_bytes())
    (out / "item_ids.json").unlink()
    (out / "item_ids.json").symlink_to(outside)

    with pytest.raises(ArtifactError, match="outside the artifact directory"):
        load_artifact(out)
