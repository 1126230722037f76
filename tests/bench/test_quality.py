"""bench/quality.py: `slimrec quality` over two seeds of the tiny presets on ml-100k.

Its figures are checked against each seed's own metrics.json: the seed means, the paired
difference (whose mean is the difference of the variants' mean NDCG@10) and the new-user ratios.
"""

from __future__ import annotations

import json
import shutil

import pytest
from slimrec.artifact import load_artifact

from slimrec.cli import main

ARGS = ["--data", "ml-100k", "--preset", "tiny", "--compress-preset", "tiny", "--threads", "2"]


@pytest.fixture(scope="module")
def quality_run(tmp_path_factory, tiny_teacher):
    out = tmp_path_factory.mktemp("quality")
    # The session's tiny teacher is seed 0 of the tiny preset: the run must reuse it, not retrain.
    shutil.copytree(tiny_teacher, out / "seed-0" / "teacher")
    assert main(["quality", "--seeds", "0,1", "--out", str(out), *ARGS]) == 0
    return out


def seed_metrics(out, variant):
    return [load_artifact(out / f"seed-{s}" / variant).read_json("metrics.json") for s in (0, 1)]


@pytest.mark.slow
def test_seed_means_are_the_means_of_each_seeds_metrics(quality_run):
    report = json.loads((quality_run / "quality.json").read_text())
    assert report["seeds"] == [0, 1] and report["dataset"] == "ml-100k"
    for variant in ("teacher", "compressed"):
        runs = seed_metrics(quality_run, variant)
        for stage in ("two_stage", "history_only"):
            got = report["variants"][variant][stage]["ndcg@10"]
            values = [r[stage]["test"]["ndcg@10"] for r in runs]
            assert got["n"] == 2
            assert got["mean"] == pytest.approx(sum(values) / 2, abs=1e-12)
            assert got["low"] < got["mean"] < got["high"]


@pytest.mark.slow
def test_paired_difference_and_new_user_ratios_agree_with_the_metrics(quality_run):
    report = json.loads((quality_run / "quality.json").read_text())
    mean = {
        v: sum(r["two_stage"]["test"]["ndcg@10"] for r in seed_metrics(quality_run, v)) / 2
        for v in report["new_users"]
    }
    paired = report["paired"]
    assert paired["users"] == 943
    assert paired["difference"]["mean"] == pytest.approx(mean["compressed"] - mean["teacher"], abs=1e-9)
    assert paired["difference"]["low"] <= paired["difference"]["mean"] <= paired["difference"]["high"]
    assert paired["verdict"] in {"beats", "matches", "loses", "inconclusive"}
    for variant, ratio in report["new_users"].items():
        history = sum(r["history_only"]["test"]["ndcg@10"] for r in seed_metrics(quality_run, variant)) / 2
        assert ratio == pytest.approx(history / mean[variant], abs=1e-9)
    assert "Paired over 943 users" in (quality_run / "quality.md").read_text()


@pytest.mark.slow
def test_a_second_run_reuses_every_artifact_and_reports_the_same(quality_run, capsys):
    before = (quality_run / "quality.json").read_text()
    capsys.readouterr()
    assert main(["quality", "--seeds", "0,1", "--out", str(quality_run), *ARGS]) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    assert (quality_run / "quality.json").read_text() == before


def test_a_repeated_seed_is_a_usage_error(tmp_path, capsys):
    assert main(["quality", "--seeds", "1,1", "--out", str(tmp_path), *ARGS]) == 2
    assert "--seeds repeats a seed: 1,1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("data", "given", "expected"),
    [
        ("ml-100k", (None, None), ("teacher", "default")),
        ("../shared/data/ml-1m", (None, None), ("teacher-averaged-large", "averaged-large")),
        ("ml-1m", ("teacher-sequence", None), ("teacher-sequence", "default")),
        ("ml-100k", ("teacher-averaged", "tiny"), ("teacher-averaged", "tiny")),
    ],
)
def test_presets_left_out_are_those_train_and_compress_would_take(data, given, expected):
    from argparse import Namespace

    from slimrec.bench.quality import resolve_presets

    args = Namespace(data=data, preset=given[0], compress_preset=given[1])
    resolve_presets(args)
    assert (args.preset, args.compress_preset) == expected
