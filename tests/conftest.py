"""Shared fixtures: the real MovieLens-100K from ../shared, and a tiny teacher trained on it once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def shared_data_dir():
    """Point named datasets at ../shared/data (CI has it beside the clone); never the network."""
    if not (SHARED_DATA / "ml-100k").is_dir():
        pytest.exit(f"MovieLens-100K not found at {SHARED_DATA / 'ml-100k'}", returncode=3)
    os.environ["SLIMREC_DATA_DIR"] = str(SHARED_DATA)
    return SHARED_DATA


@pytest.fixture(scope="module", autouse=True)
def module_state_dir(tmp_path_factory):
    """Servers and apps built by module-scoped fixtures keep their split and logs in the module's
    own directory, never in ./slimrec-state (a stored split wins over the configured one)."""
    previous = os.environ.get("SLIMREC_STATE_DIR")
    os.environ["SLIMREC_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield
    if previous is None:
        os.environ.pop("SLIMREC_STATE_DIR", None)
    else:
        os.environ["SLIMREC_STATE_DIR"] = previous


@pytest.fixture(autouse=True)
def state_dir(tmp_path_factory, monkeypatch) -> Path:
    """Each test's apps get a state directory of their own (see module_state_dir)."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("SLIMREC_STATE_DIR", str(path))
    return path


@pytest.fixture(scope="session")
def ml100k(shared_data_dir):
    from slimrec.models.movielens import load_dataset

    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, shared_data_dir) -> Path:
    """A teacher artifact trained with the "tiny" preset on ml-100k through the real CLI."""
    from slimrec.cli import main

    out = tmp_path_factory.mktemp("artifacts") / "teacher"
    assert main(["train", "--preset", "tiny", "--data", "ml-100k", "--out", str(out), "--threads", "2"]) == 0
    return out
