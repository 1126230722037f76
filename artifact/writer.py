"""Writing artifacts: all-or-nothing directories.

`ArtifactWriter` fills a hidden temporary sibling directory and renames it into place on
`commit()`, so a reader never sees a half-written artifact. Existing artifacts are amended
by `slimrec.artifact.amend`.

Example:
    >>> with ArtifactWriter(out, "full", config={"dim": 64}, data={"dataset": "ml-100k"}) as writer:
    ...     writer.write_tensors("weights.safetensors", {"item_emb": item_emb})
    ...     writer.write_json("item_ids.json", item_ids)
    >>> load_artifact(out).read_tensors("weights.safetensors")["item_emb"].shape
    (1682, 64)
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import safetensors.numpy
from slimrec.artifact.atomic import atomic_write_bytes, fsync_dir
from slimrec.artifact.manifest import (
    COMPUTED_FIELDS,
    DEFAULT_SPLIT,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    METRICS,
    ROLES,
    ArtifactError,
    checked_relpath,
    installed_versions,
    json_bytes,
    sha256_file,
    slimrec_version,
)


def _utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


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
            raise ArtifactError(
                f"{directory}: artifact directory needs a name (got an empty, '.' or '..' path)"
            )
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

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:
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
            data = json_bytes(obj)
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
            atomic_write_bytes(self._tmp / MANIFEST, json_bytes(manifest))
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
            return checked_relpath(rel)
        except ValueError as e:
            raise ArtifactError(f"{self.directory}: {e}") from e

    def _check_open(self) -> None:
        if self._closed:
            raise ArtifactError(f"{self.directory}: writer already committed or aborted")

    def _check_serializable(self, key: str, value: Any) -> None:
        # Fail at the call site, not at commit after minutes of training output.
        try:
            json_bytes(value)
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
            "slimrec_version": slimrec_version(),
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
        fsync_dir(final.parent)
