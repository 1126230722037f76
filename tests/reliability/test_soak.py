"""`slimrec soak`, short: CI's version of the soak benchmark (the long run is done by hand, see
serving/README.md): both variants under steady load for 10 s, zero errors, flat server memory.
"""

from __future__ import annotations

import json

import pytest
from serving_fixtures import copy_artifact

from slimrec.cli import main


def test_soak_short_run_has_no_errors_and_flat_memory(tiny_teacher, tmp_path, capsys):
    artifact = copy_artifact(tiny_teacher, tmp_path / "teacher")
    report_path = tmp_path / "soak.json"
    code = main(
        [
            "soak",
            "--start",
            f"full={artifact},compressed={artifact}",
            "--duration",
            "10s",
            "--warmup",
            "3s",
            "--concurrency",
            "4",
            "--max-requests",
            "20000",
            "--json",
            str(report_path),
        ]
    )
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    print(printed)
    assert report["errors"] == 0, report["error_examples"]
    assert report["requests_measured"] > 100 and min(report["ok_per_variant"].values()) > 50
    assert report["rss_samples"] >= 8 and abs(report["rss_growth_pct"]) < 5, report
    assert report["server_exit_code"] == 0 and code == 0
    assert "p50" in printed and "growth" in printed


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--duration", "25h", "at most 24 h"),
        ("--duration", "3 parsecs", "expected e.g. 60s"),
        ("--warmup", "1m", "must be shorter than --duration"),
    ],
)
def test_soak_rejects_bad_durations_before_starting_a_server(tiny_teacher, capsys, flag, value, named):
    argv = ["soak", "--start", f"full={tiny_teacher}", "--duration", "30s", flag, value]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("slimrec soak: error: ") and named in err[0]
