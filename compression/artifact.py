"""Artifacts: directories of model files described by a checksummed JSON manifest.

Every trained or compressed model is saved as one directory that the server
loads as a unit:

    <dir>/
      manifest.json   # format, versions, config, data, and sha256 + size + role of every file
      metrics.json    # offline evaluation, listed in the manifest with role "offline"
      ...             # onnx graphs, safetensors weights, faiss indexes, json id maps

Writes are all-or-nothing: `ArtifactWriter` fills a hidden temporary sibling
directory and renames it into place on `commit()`, so a reader never sees a
half-written artifact. Loads are verified: `load_artifact` refuses an artifact
whose files are missing, truncated or modified, naming the file. Nothing here
unpickles anything: weights are safetensors, everything else is JSON.

Example:
    >>> with ArtifactWriter(out, "full", config={"dim": 64}, data={"dataset": "ml-100k"}) as writer:
    ...     writer.write_tensors("weights.safetensors", {"item_emb": item_emb})
    ...     writer.write_json("item_ids.json", item_ids)
    >>> artifact = load_artifact(out)
    >>> artifact.read_tensors("weights.safetensors")["item_emb"].shape
    (1682, 64)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np
import safetensors.numpy

from slimrec import __version__ as SLIMREC_VERSION

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


# --- small helpers -------------------------------------------------------------------------------


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


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    # Configs and metrics are often built from numpy scalars; store them as plain JSON numbers.
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_bytes(obj: Any) -> bytes:
    # allow_nan=False: NaN/Infinity are not JSON, and the API's clients would choke on them.
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False, default=_json_default)
    return (text + "\n").encode()


def _checked_relpath(rel: str) -> str:
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


def _fsync_dir(directory: Path) -> None:
    # Make renames durable; directories cannot be opened for fsync on every platform.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so readers see the old or the new content, never a mix."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _is_replaceable_artifact_dir(directory: Path) -> bool:
    # Only ever delete what is recognisably an artifact (or empty): a typo'd output path
    # must not rmtree someone's home directory.
    if directory.is_symlink() or not directory.is_dir():
        return False
    return (directory / MANIFEST).is_file() or not any(directory.iterdir())


# --- writing -------------------------------------------------------------------------------------


class ArtifactWriter:
    """Builds an artifact in a temporary sibling directory and renames it into place on commit.

    Files written through the writer (or directly under `writer.path(rel)`) are all listed
    in the manifest with their sha256, size and role ("served" by default, "offline" for
    metrics.json; change it with `set_role`).

    Args:
        directory: final artifact directory. An existing artifact (or empty directory) there is
            replaced on commit; any other existing path is refused.
        variant: "full", "compressed", ...
        config: model/training configuration, stored verbatim (must be JSON-serializable).
        data: {"dataset": ..., "fingerprint": ..., "split": ...}; "split" defaults to "PROTOCOL.md".

    Example:
        >>> with ArtifactWriter("artifacts/full", "full", {"dim": 64}, {"dataset": "ml-100k"}) as w:
        ...     w.write_tensors("weights.safetensors", {"user_emb": user_emb})
        ...     torch.onnx.export(model, args, w.path("model.onnx"))
        ...     w.set("promotable", True)
    """

    def __init__(self, directory: str | Path, variant: str, config: dict, data: dict):
        self.directory = Path(directory)
        if self.directory.name in ("", ".", ".."):
            raise ArtifactError(f"{directory}: artifact directory needs a name (got an empty, '.' or '..' path)")
        if not isinstance(variant, str) or not variant:
            raise ArtifactError(f"{self.directory}: variant must be a non-empty string, got {variant!r}")
        if self.directory.exists() and not _is_replaceable_artifact_dir(self.directory):
            raise ArtifactError(
                f"{self.directory}: exists and is not an artifact directory, refusing to replace it"
            )
        self._manifest: dict[str, Any] = {
            "variant": variant,
            "config": dict(config),
            "data": {"split": DEFAULT_SPLIT, **data},
            "promotable": None,
            "extra": {},
        }
        self._check_serializable("config", self._manifest["config"])
        self._check_serializable("data", self._manifest["data"])
        self._roles: dict[str, str] = {}
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.directory.name}.tmp-", dir=self.directory.parent))
        self._closed = False

    # Context manager: commit when the block succeeds, leave nothing behind when it raises.
    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.commit()
        return False

    def path(self, rel: str) -> Path:
        """Where to write file `rel` (parents created), for writers that open files themselves.

        Args:
            rel: relative POSIX path inside the artifact, e.g. "index/items.faiss".

        Returns:
            The path inside the temporary directory; it is listed in the manifest on commit.

        Example:
            >>> faiss.write_index(index, str(writer.path("items.faiss")))
        """
        self._check_open()
        target = self._tmp / self._relpath(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def write_json(self, rel: str, obj: Any) -> Path:
        """Write `obj` as UTF-8 JSON (numpy scalars/arrays converted; NaN refused).

        Args:
            rel: relative path, e.g. "item_ids.json".
            obj: JSON-serializable value.

        Returns:
            The written path.

        Example:
            >>> writer.write_json("item_ids.json", ["1", "2", "50"])
        """
        target = self.path(rel)
        try:
            data = _json_bytes(obj)
        except (TypeError, ValueError) as e:
            raise ArtifactError(f"{rel}: cannot write as JSON: {e}") from e
        target.write_bytes(data)
        return target

    def write_tensors(
        self, rel: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None
    ) -> Path:
        """Write numpy arrays as a safetensors file.

        Args:
            rel: relative path, e.g. "weights.safetensors".
            tensors: name -> array (any layout; made contiguous before writing).
            metadata: optional str -> str header metadata.

        Returns:
            The written path.

        Example:
            >>> writer.write_tensors("weights.safetensors", {"item_emb": emb}, {"dtype": "float16"})
        """
        for name, array in tensors.items():
            if not isinstance(array, np.ndarray):
                raise ArtifactError(f"{rel}: tensor {name!r} is a {type(array).__name__}, not a numpy array")
        if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
            raise ArtifactError(f"{rel}: safetensors metadata values must be strings")
        # safetensors.numpy writes the raw buffer: a transposed or strided view would be saved
        # in memory order, silently scrambling the weights.
        contiguous = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
        target = self.path(rel)
        safetensors.numpy.save_file(contiguous, target, metadata=metadata)
        return target

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write raw bytes.

        Args:
            rel: relative path.
            data: file content.

        Returns:
            The written path.

        Example:
            >>> writer.write_bytes("model.onnx", onnx_model.SerializeToString())
        """
        target = self.path(rel)
        target.write_bytes(data)
        return target

    def set_role(self, rel: str, role: str) -> None:
        """Mark file `rel` "served" (loaded by the server, counts in served_bytes) or "offline".

        Args:
            rel: relative path of a file written (now or before commit) into the artifact.
            role: one of ROLES.

        Example:
            >>> writer.set_role("train_history.json", "offline")
        """
        self._check_open()
        if role not in ROLES:
            raise ArtifactError(f"{rel}: unknown role {role!r}, expected one of {ROLES}")
        self._roles[self._relpath(rel)] = role

    def set(self, key: str, value: Any) -> None:
        """Set a top-level manifest field such as "promotable" (bool or None) or "extra" (dict).

        Args:
            key: manifest field; computed fields (format, files, versions, ...) are refused.
            value: JSON-serializable value.

        Example:
            >>> writer.set("extra", {"quantization": "int8-dynamic"})
        """
        self._check_open()
        if key in COMPUTED_FIELDS:
            raise ArtifactError(
                f"{self.directory}: manifest field {key!r} is computed on commit, not settable"
            )
        if key == "promotable" and value is not None and not isinstance(value, bool):
            raise ArtifactError(f"{self.directory}: promotable must be true, false or null, got {value!r}")
        self._check_serializable(key, value)
        self._manifest[key] = value

    def commit(self) -> Path:
        """Checksum every file, write manifest.json, and rename the artifact into place.

        Returns:
            The final artifact directory.

        Example:
            >>> writer.commit()
            PosixPath('artifacts/full')
        """
        self._check_open()
        try:
            manifest = self._build_manifest()
            _atomic_write_bytes(self._tmp / MANIFEST, _json_bytes(manifest))
            self._swap_into_place()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        return self.directory

    def abort(self) -> None:
        """Discard everything written; the final directory is left untouched.

        Example:
            >>> writer.abort()
        """
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._closed = True

    # -- internals --

    def _relpath(self, rel: str) -> str:
        try:
            return _checked_relpath(rel)
        except ValueError as e:
            raise ArtifactError(f"{self.directory}: {e}") from e

    def _check_open(self) -> None:
        if self._closed:
            raise ArtifactError(f"{self.directory}: writer already committed or aborted")

    def _check_serializable(self, key: str, value: Any) -> None:
        # Fail at the call site, not at commit after minutes of training output.
        try:
            _json_bytes(value)
        except (TypeError, ValueError) as e:
            raise ArtifactError(
                f"{self.directory}: manifest field {key!r} is not JSON-serializable: {e}"
            ) from e

    def _written_files(self) -> list[str]:
        files = []
        for path in sorted(self._tmp.rglob("*")):
            rel = path.relative_to(self._tmp).as_posix()
            if path.is_symlink():
                # A link could point outside the artifact and be served from there.
                raise ArtifactError(f"{self.directory}: {rel} is a symlink, artifacts hold plain files only")
            if path.is_file() and rel != MANIFEST:
                files.append(self._relpath(rel))
        return files

    def _build_manifest(self) -> dict[str, Any]:
        written = self._written_files()
        unwritten = sorted(set(self._roles) - set(written))
        if unwritten:
            raise ArtifactError(f"{self.directory}: set_role for files never written: {', '.join(unwritten)}")
        files = {
            rel: {
                "sha256": sha256_file(self._tmp / rel),
                "bytes": (self._tmp / rel).stat().st_size,
                "role": self._roles.get(rel, "offline" if rel == METRICS else "served"),
            }
            for rel in written
        }
        m = self._manifest
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "slimrec_version": SLIMREC_VERSION,
            "variant": m["variant"],
            "created_at": _utc_now_iso(),
            "config": m["config"],
            "data": m["data"],
            "promotable": m["promotable"],
            "versions": installed_versions(),
            "files": files,
            **{k: v for k, v in m.items() if k not in ("variant", "config", "data", "promotable")},
        }

    def _swap_into_place(self) -> None:
        final = self.directory
        if not (final.exists() or final.is_symlink()):
            os.rename(self._tmp, final)
        else:
            if not _is_replaceable_artifact_dir(final):
                raise ArtifactError(
                    f"{final}: exists and is not an artifact directory, refusing to replace it"
                )
            # Directories cannot be os.replace'd over non-empty ones: move the old one aside,
            # move the new one in (restoring the old one if that fails), then delete the old one.
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
            os.rename(final, old)
            try:
                os.rename(self._tmp, final)
            except BaseException:
                os.rename(old, final)
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(final.parent)


# --- loading -------------------------------------------------------------------------------------


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
        _verify_files(self.path, self.files, checksums=True)

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
    manifest = _read_manifest(root / MANIFEST)
    _verify_files(root, manifest["files"], checksums=verify)
    return Artifact(root, manifest)


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
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
        fail(f"unsupported format_version {version!r}; this slimrec ({SLIMREC_VERSION}) reads {supported}")
    if not isinstance(manifest.get("variant"), str):
        fail("variant missing or not a string")
    if not isinstance(manifest.get("config", {}), dict):
        fail("config is not an object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        fail("files missing or not an object")
    for rel, entry in files.items():
        try:
            _checked_relpath(rel)
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


def _verify_files(root: Path, files: dict[str, dict[str, Any]], checksums: bool) -> None:
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


def update_metrics(path: str | Path, metrics: dict) -> Path:
    """Write metrics.json into an existing artifact and record its checksum in the manifest.

    Example:
        >>> update_metrics("artifacts/compressed", {"recall@10": 0.21, "ndcg@10": 0.12})
    """
    try:
        data = _json_bytes(metrics)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{Path(path) / METRICS}: cannot write as JSON: {e}") from e
    amend_artifact(path, files={METRICS: (data, "offline")})
    return Path(path) / METRICS


def amend_artifact(path: str | Path, files: dict[str, tuple[bytes, str]] | None = None,
                   fields: dict[str, Any] | None = None) -> Path:
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
        rel = _checked_relpath(rel)
        if role not in ROLES:
            raise ArtifactError(f"{root / rel}: role must be one of {ROLES}, got {role!r}")
        manifest["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "role": role}
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(root / rel, data)
    try:
        manifest_bytes = _json_bytes(manifest)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{root / MANIFEST}: cannot write as JSON: {e}") from e
    _atomic_write_bytes(root / MANIFEST, manifest_bytes)
    return root
