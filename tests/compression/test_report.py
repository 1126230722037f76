"""compression/report.py: the resident memory of a served model is measured, and a failed probe says so."""

from __future__ import annotations

from pathlib import Path

import pytest
from slimrec.compression.report import resident_bytes

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "ml100k-tiny-compressed"


def test_loading_the_golden_artifact_grows_the_process():
    # ONNX sessions, the FAISS index and the tables: a few MiB at least, never 0 or negative.
    assert resident_bytes(GOLDEN) > 1 << 20


def test_a_probe_that_cannot_load_the_artifact_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="measuring the resident memory"):
        resident_bytes(tmp_path / "no-artifact")


def test_history_only_ratio_is_new_users_over_known_users_on_test():
    from slimrec.compression.report import history_only_ratio

    row = {"two_stage": {"test": {"ndcg@10": 0.16}}, "history_only": {"test": {"ndcg@10": 0.152}}}
    assert history_only_ratio(row) == pytest.approx(0.95)
    # An artifact evaluated before history-only figures existed: no ratio, not an error.
    assert history_only_ratio({"two_stage": {"test": {"ndcg@10": 0.16}}}) is None
