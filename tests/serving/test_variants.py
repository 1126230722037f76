"""serving/variants.py: a variant's model_version is a content address of its served files."""

from __future__ import annotations

import shutil
from pathlib import Path

from slimrec.artifact import amend_artifact, load_artifact, update_metrics
from slimrec.serving.variants import model_version

GOLDEN = Path(__file__).parents[1] / "golden" / "ml100k-tiny-compressed"


def test_re_evaluating_a_model_keeps_its_version(tmp_path):
    artifact = shutil.copytree(GOLDEN, tmp_path / "a")
    before = model_version(load_artifact(artifact))
    update_metrics(artifact, {"ndcg@10": 0.5})  # offline files: metrics, reports
    amend_artifact(artifact, files={"report.md": (b"# re-evaluated\n", "offline")})
    assert model_version(load_artifact(artifact)) == before


def test_a_changed_served_file_changes_the_version(tmp_path):
    artifact = shutil.copytree(GOLDEN, tmp_path / "a")
    before = model_version(load_artifact(artifact))
    amend_artifact(artifact, files={"note.json": (b"{}", "served")})
    after = model_version(load_artifact(artifact))
    assert after != before and after.startswith("compressed-")


def test_the_same_files_in_another_directory_have_the_same_version(tmp_path):
    a = shutil.copytree(GOLDEN, tmp_path / "a")
    b = shutil.copytree(GOLDEN, tmp_path / "b")
    assert model_version(load_artifact(a)) == model_version(load_artifact(b))
