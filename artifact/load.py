"""Loading artifacts: the manifest validated, every listed file present and (by default) checksummed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.numpy
from slimrec.artifact.manifest import MANIFEST, METRICS, ArtifactError, read_manifest, verify_files


class Artifact:
    """A loaded artifact whose manifest was validated (and, by default, every file checksummed).

    Build one with `load_artifact`. Only files listed in the manifest are reachable.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r}, variant={self.variant!r})"

    @property
    def variant(self) -> str:
        return self.manifest["variant"]

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]

    def file(self, rel: str) -> Path:
        """Path of listed file `rel`.

        Args:
            rel: relative path as listed in the manifest.

        Returns:
            The path inside the artifact directory.

        Example:
            >>> onnxruntime.InferenceSession(artifact.file("model.onnx"))
        """
        if rel not in self.files:
            raise ArtifactError(f"{self.path / MANIFEST}: {rel!r} is not listed in the manifest")
        return self.path / rel

    def read_json(self, rel: str) -> Any:
        """Parse listed JSON file `rel`.

        Example:
            >>> item_ids = artifact.read_json("item_ids.json")
        """
        path = self.file(rel)
        try:
            return json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{path}: not valid JSON: {e}") from e

    def read_tensors(self, rel: str) -> dict[str, np.ndarray]:
        """Load listed safetensors file `rel` as numpy arrays (no pickle involved).

        Example:
            >>> item_emb = artifact.read_tensors("weights.safetensors")["item_emb"]
        """
        return safetensors.numpy.load_file(self.file(rel))

    def served_bytes(self) -> int:
        """Total size of the files the server loads (role "served"), the compression headline.

        Example:
            >>> artifact.served_bytes()
            1048576
        """
        return sum(entry["bytes"] for entry in self.files.values() if entry["role"] == "served")

    def total_bytes(self) -> int:
        """Total size of all listed files (manifest.json excluded)."""
        return sum(entry["bytes"] for entry in self.files.values())

    def verify(self) -> None:
        """Re-check every listed file's presence, size and sha256; raises ArtifactError on the first problem.

        Example:
            >>> artifact.verify()  # e.g. from a health check
        """
        verify_files(self.path, self.files, checksums=True)

    def summary(self) -> dict[str, Any]:
        """Small description for the API: variant, provenance, sizes and metrics if evaluated.

        Example:
            >>> artifact.summary()["sizes"]
            {'served_bytes': 1048576, 'total_bytes': 1050000}
        """
        summary: dict[str, Any] = {
            "variant": self.variant,
            "created_at": self.manifest.get("created_at"),
            "slimrec_version": self.manifest.get("slimrec_version"),
            "promotable": self.manifest.get("promotable"),
            "sizes": {"served_bytes": self.served_bytes(), "total_bytes": self.total_bytes()},
        }
        if METRICS in self.files:
            summary["metrics"] = self.read_json(METRICS)
        return summary


def load_artifact(path: str | Path, verify: bool = True) -> Artifact:
    """Load and validate an artifact directory.

    The manifest's format, version and file list are always checked, and every listed file
    must exist with its recorded size (a cheap stat). Files not listed are ignored.

    Args:
        path: artifact directory.
        verify: also sha256 every listed file (reads all bytes once).

    Returns:
        The loaded Artifact.

    Raises:
        ArtifactError: naming the file and the problem (missing, truncated, checksum mismatch,
            unsupported format_version, path escaping the directory, invalid JSON, ...).

    Example:
        >>> artifact = load_artifact("artifacts/compressed")
        >>> artifact.variant
        'compressed'
    """
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not an artifact directory (does not exist or is not a directory)")
    manifest = read_manifest(root / MANIFEST)
    verify_files(root, manifest["files"], checksums=verify)
    return Artifact(root, manifest)
