"""The artifact format: what a manifest holds, which file paths it may list, and how files are checked.

An artifact is a directory of model files described by `manifest.json` (format, versions,
config, data, and sha256 + size + role of every file). `slimrec.artifact.load` reads one,
`slimrec.artifact.writer` writes one and `slimrec.artifact.amend` amends one; all follow the
rules kept here. Nothing here unpickles anything: weights are safetensors, everything else is JSON.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

FORMAT = "slimrec-artifact"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
METRICS = "metrics.json"
ROLES = ("served", "offline")
DEFAULT_SPLIT = "PROTOCOL.md"

# Manifest fields the writer computes itself; `ArtifactWriter.set` may not override them,
# so a manifest always tells the truth about its own format, files and environment.
COMPUTED_FIELDS = frozenset(
    {"format", "format_version", "slimrec_version", "created_at", "versions", "files"}
)

# Installed distributions to record, by manifest key; the first one installed wins
# (faiss ships under several distribution names).
VERSIONED_PACKAGES = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "numpy": ("numpy",),
}

_CHUNK_BYTES = 1 << 20


class ArtifactError(ValueError):
    """An artifact that cannot be written or loaded; the message names the file and the problem."""


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so large weights never sit in memory twice.

    Args:
        path: file to hash.

    Returns:
        The lowercase hex digest.

    Example:
        >>> sha256_file("artifacts/full/weights.safetensors")
        'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def installed_versions() -> dict[str, str | None]:
    """Versions of Python and the libraries whose behaviour an artifact depends on.

    Returns:
        {"python": ..., "torch": ..., "onnxruntime": ..., "faiss": ..., "numpy": ...};
        a package that is not installed maps to None.

    Example:
        >>> installed_versions()["numpy"]
        '2.1.3'
    """
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, distributions in VERSIONED_PACKAGES.items():
        versions[key] = _first_installed_version(distributions)
    return versions


def _first_installed_version(distributions: tuple[str, ...]) -> str | None:
    for name in distributions:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
    return None


def slimrec_version() -> str:
    """The installed slimrec's version (read from its distribution, so this package imports none of it)."""
    return _first_installed_version(("slimrec",)) or "unknown"


def _json_default(value: Any) -> Any:
    # Configs and metrics are often built from numpy scalars; store them as plain JSON numbers.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def json_bytes(obj: Any) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON, and the API's clients would choke on them.
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    return (text + "\n").encode()


def checked_relpath(rel: str) -> str:
    """Validate a manifest file key: a canonical relative POSIX path inside the artifact.

    Raises ValueError naming the problem; callers add which artifact it came from.
    """
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"file path {rel!r} must be a non-empty string")
    if "\\" in rel or "\x00" in rel:
        raise ValueError(f"file path {rel!r} contains a backslash or NUL")
    posix = PurePosixPath(rel)
    if posix.is_absolute() or PureWindowsPath(rel).anchor:
        raise ValueError(f"file path {rel!r} is absolute, it must be relative to the artifact directory")
    if ".." in posix.parts:
        raise ValueError(f"file path {rel!r} escapes the artifact directory")
    # Canonical form only ("a/b", not "./a//b"), so one file has exactly one manifest key.
    if str(posix) != rel:
        raise ValueError(f"file path {rel!r} is not canonical, write it as {str(posix)!r}")
    if rel == MANIFEST:
        raise ValueError(f"{MANIFEST} cannot list itself")
    return rel


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    try:
        raw = manifest_path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(f"{manifest_path}: missing, this is not an artifact directory") from None
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {e}") from e
    _validate_manifest(manifest_path, manifest)
    return manifest


def _validate_manifest(manifest_path: Path, manifest: Any) -> None:
    def fail(problem: str) -> None:
        raise ArtifactError(f"{manifest_path}: {problem}")

    if not isinstance(manifest, dict):
        fail(f"expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        fail(f"format is {manifest.get('format')!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if type(version) is not int or version not in SUPPORTED_FORMAT_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
        fail(f"unsupported format_version {version!r}; this slimrec ({slimrec_version()}) reads {supported}")
    if not isinstance(manifest.get("variant"), str):
        fail("variant missing or not a string")
    if not isinstance(manifest.get("config", {}), dict):
        fail("config is not an object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("files missing or not an object")
    for rel, entry in files.items():
        try:
            checked_relpath(rel)
        except ValueError as e:
            fail(f"files: {e}")
        _validate_file_entry(manifest_path, rel, entry)


def _validate_file_entry(manifest_path: Path, rel: str, entry: Any) -> None:
    where = f"{manifest_path}: files[{rel!r}]"
    if not isinstance(entry, dict):
        raise ArtifactError(f"{where}: expected an object")
    sha = entry.get("sha256")
    if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise ArtifactError(f"{where}: sha256 must be 64 lowercase hex digits")
    size = entry.get("bytes")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ArtifactError(f"{where}: bytes must be a non-negative integer")
    if entry.get("role") not in ROLES:
        raise ArtifactError(f"{where}: role {entry.get('role')!r} is not one of {ROLES}")


def verify_files(root: Path, files: dict[str, dict[str, Any]], checksums: bool) -> None:
    resolved_root = root.resolve()
    for rel, entry in files.items():
        path = root / rel
        # Lexically safe keys can still escape through a symlink inside the directory.
        if not path.resolve().is_relative_to(resolved_root):
            raise ArtifactError(f"{path}: resolves outside the artifact directory")
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (listed in {MANIFEST})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            how = "truncated" if size < entry["bytes"] else "file was modified"
            raise ArtifactError(
                f"{path}: size mismatch ({how}): {size} bytes, {MANIFEST} says {entry['bytes']}"
            )
        if checksums:
            actual = sha256_file(path)
            if actual != entry["sha256"]:
                raise ArtifactError(
                    f"{path}: checksum mismatch, file was modified "
                    f"(sha256 {actual[:12]}..., {MANIFEST} says {entry['sha256'][:12]}...)"
                )


# --- updating ------------------------------------------------------------------------------------
