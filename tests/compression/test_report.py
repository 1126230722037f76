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
