"""Amending an existing artifact: replace or add files and manifest fields, atomically, checksums kept.

`update_metrics` writes metrics.json; `amend_artifact` adds or replaces any files (with their
role) and top-level manifest fields. New artifacts are written by `slimrec.artifact.writer`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from slimrec.artifact.atomic import atomic_write_bytes
from slimrec.artifact.load import load_artifact
from slimrec.artifact.manifest import (
    COMPUTED_FIELDS,
    MANIFEST,
    METRICS,
    ROLES,
    ArtifactError,
    checked_relpath,
    json_bytes,
)


def update_metrics(path: str | Path, metrics: dict) -> Path:
    """Write metrics.json into an existing artifact and record its checksum in the manifest.

    Example:
        >>> update_metrics("artifacts/compressed", {"recall@10": 0.21, "ndcg@10": 0.12})
    """
    try:
        data = json_bytes(metrics)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{Path(path) / METRICS}: cannot write as JSON: {e}") from e
    amend_artifact(path, files={METRICS: (data, "offline")})
    return Path(path) / METRICS


def amend_artifact(
    path: str | Path, files: dict[str, tuple[bytes, str]] | None = None, fields: dict[str, Any] | None = None
) -> Path:
    """Add or replace files ({rel: (bytes, role)}) and top-level manifest fields of an artifact.

    Each file is replaced atomically (temp file + os.replace), the manifest last: a crash in
    between leaves a file that fails its checksum on load, never content that silently passes
    verification. Concurrent amendments of one artifact are not serialized; the last one wins.

    Example:
        >>> amend_artifact("artifacts/compressed", {"report.md": (text.encode(), "offline")},
        ...                {"promotable": False})
    """
    root = Path(path)
    # Structure check only: hashing every weight file is the loader's job, and the other
    # entries are carried over unchanged so any tampering with them is still caught later.
    manifest = load_artifact(root, verify=False).manifest
    for key, value in (fields or {}).items():
        if key in COMPUTED_FIELDS:
            raise ArtifactError(f"{root}: manifest field {key!r} is computed on commit, not settable")
        if key == "promotable" and value is not None and not isinstance(value, bool):
            raise ArtifactError(f"{root}: promotable must be true, false or null, got {value!r}")
        manifest[key] = value
    for rel, (data, role) in (files or {}).items():
        rel = checked_relpath(rel)
        if role not in ROLES:
            raise ArtifactError(f"{root / rel}: role must be one of {ROLES}, got {role!r}")
        manifest["files"][rel] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data),
            "role": role,
        }
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / rel, data)
    try:
        manifest_bytes = json_bytes(manifest)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{root / MANIFEST}: cannot write as JSON: {e}") from e
    atomic_write_bytes(root / MANIFEST, manifest_bytes)
    return root
