"""`slimrec bench`: the offline benchmark stays runnable (tiny runs), and its helpers are exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
from slimrec.bench.scale_config import ScaleConfig
from slimrec.compression.gate import GateConfig
from slimrec.compression.tune_candidates import choose_budget

from slimrec.cli import main


def _medians(report: dict) -> dict:
    return {(r["variant"], r["batch"], r["threads"]): r["stages"] for r in report["latency"]}


def test_bench_two_artifacts_end_to_end(tiny_teacher, tmp_path, capsys):
    out = tmp_path / "bench"
    argv = [
        "bench",
        "--full",
        str(tiny_teacher),
        "--compressed",
        str(tiny_teacher),
        "--out",
        str(out),
        "--repeats",
        "6",
        "--batch-repeats",
        "2",
        "--warmup",
        "1",
    ]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    assert set(report["variants"]) == {"full", "compressed"}
    threads = report["settings"]["threads"]
    assert threads[0] == 1 and report["settings"]["batches"] == [1, 32]
    medians = _medians(report)
    for variant in ("full", "compressed"):
        assert report["variants"][variant]["memory"]["resident_bytes"] > 0
        for batch in (1, 32):
            for t in threads:
                stages = medians[(variant, batch, t)]
                assert set(stages) == {"embed", "retrieve", "rank", "total"}
                assert all(s["median_ms"] > 0 and s["p99_ms"] >= s["median_ms"] for s in stages.values())
    assert len(report["ratios"]) == 2 * len(threads)
    for row in report["ratios"]:
        key = (row["batch"], row["threads"])
        for stage, ratio in row["stages"].items():
            compressed, full = medians[("compressed", *key)][stage], medians[("full", *key)][stage]
            assert ratio["median"] == pytest.approx(compressed["median_ms"] / full["median_ms"])
            assert ratio["p99"] == pytest.approx(compressed["p99_ms"] / full["p99_ms"])
    assert report["memory_ratio"] > 0
    printed = capsys.readouterr().out
    assert "compressed / full" in printed and "user tower" in printed
    assert "compressed / full" in (out / "bench.md").read_text()


def test_bench_catalogue_tiny_end_to_end(tmp_path):
    out = tmp_path / "scale"
    argv = [
        "bench",
        "--catalogue",
        "2k",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--repeats",
        "5",
        "--batch-repeats",
        "2",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--batches",
        "1,4",
    ]
    assert main(argv) == 0
    report = json.loads((out / "scale.json").read_text())
    (run,) = report["sizes"]
    build = run["build"]
    assert build["shape"]["n_items"] == 2000 and build["shape"]["n_users"] == 1000
    assert 0.0 <= build["index_recall@200"] <= 1.0
    assert build["index"]["compressed"]["kind"] == "ivf_sq6" and build["index"]["full"]["kind"] == "flat"
    assert build["index"]["compressed"]["build_seconds"] > 0
    for stage in ("teacher_retrieval", "teacher_ranker", "student_retrieval", "student_ranker"):
        assert build["training"][stage]["epochs"] == 1 and build["seconds"][stage] > 0
    # The student's rare items share the fallback row (embedding_min_count 10): fewer rows than
    # items with fitted interactions, and at least the fallback row plus one.
    rows = build["shape"]["compressed_id_rows"]
    for table in ("user_tower.history.embedding", "ranker.item_embedding"):
        assert 2 <= rows[table] < build["shape"]["items_with_fitted_interactions"], rows
    # Each variant's blend weight is the grid's best on the tuning users, and the artifact serves it.
    for variant, blend in build["blend_weight"].items():
        by_weight = blend["ndcg@10_by_weight"]
        assert set(by_weight) == {str(w) for w in ScaleConfig().retrieval_weights}
        assert by_weight[str(blend["chosen"])] == max(by_weight.values())
        manifest = json.loads((out / "2k" / variant / "manifest.json").read_text())
        assert manifest["config"]["models"][""]["retrieval_weight"] == blend["chosen"]
    # The compressed artifact serves the candidate budget chosen by compress's rule on the tuning users.
    budget = build["candidate_budget"]
    assert budget["chosen"] in GateConfig().candidate_budgets
    manifest = json.loads((out / "2k" / "compressed" / "manifest.json").read_text())
    assert manifest["serving"]["n_candidates"] == budget["chosen"]
    assert choose_budget([budget["known"], budget["new_users"]], budget["tolerance"]) == budget["chosen"]
    variants = run["bench"]["variants"]
    assert variants["full"]["embedding_dim"] > variants["compressed"]["embedding_dim"]
    assert variants["compressed"]["index"]["kind"] == "ivf_sq6"
    assert all(v["index_bytes"] > 0 and v["memory"]["resident_bytes"] > 0 for v in variants.values())
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "recall@200" in (out / "scale.md").read_text()
    assert (out / "2k" / "bench.json").is_file()
    # Asked again with the same parameters, the build reuses the data and artifacts it left.
    from slimrec.bench.scale import build_size, parse_sizes

    (size,) = parse_sizes("2k")
    assert build_size(size, out / "2k", ScaleConfig.for_preset("tiny")) == build


def test_bench_missing_artifact_is_a_usage_error(tmp_path, capsys):
    argv = ["bench", "--full", str(tmp_path / "nope"), "--compressed", str(tmp_path), "--repeats", "1"]
    assert main(argv) == 2
    assert "--full" in capsys.readouterr().err


# --- helpers ----------------------------------------------------------------------------------


def test_parse_sizes_named_interpolated_and_explicit():
    from slimrec.bench.scale import SHAPES, parse_sizes

    sizes = parse_sizes("10k, 1m,2k:1k:20k")
    assert [(s.n_items, s.n_users, s.n_interactions) for s in sizes[:2]] == [SHAPES[1][:3], SHAPES[3][:3]]
    assert sizes[2].label == "2k-1k-20k" and sizes[2].n_interactions == 20_000
    (middle,) = parse_sizes("31623")  # ~ sqrt(10k * 100k): users and interactions halfway in log space
    assert middle.n_users == pytest.approx(np.sqrt(20_000 * 50_000), rel=0.01)


@pytest.mark.parametrize("text", ["", "2k:1k", "ten", "0", "2k:1k:1k", "10k,10k", "1.5"])
def test_parse_sizes_rejects(text):
    from slimrec.bench.scale import parse_sizes

    with pytest.raises(ValueError):
        parse_sizes(text)


@pytest.mark.parametrize(
    ("text", "value"), [("2k", 2_000), ("1M", 1_000_000), ("1.5k", 1_500), ("500_000", 500_000), (" 7 ", 7)]
)
def test_parse_count(text, value):
    from slimrec.bench.argtypes import parse_count

    assert parse_count(text) == value


@pytest.mark.parametrize("text", ["0", "1.5", "ten", "k", "-2k"])
def test_parse_count_rejects(text):
    from slimrec.bench.argtypes import parse_count

    with pytest.raises(ValueError, match="count"):
        parse_count(text)


def test_int_list():
    import argparse

    from slimrec.bench.argtypes import int_list

    assert int_list("1,32") == (1, 32) and int_list("0") == (0,)
    for bad in ("", "1,-1", "a,b"):
        with pytest.raises(argparse.ArgumentTypeError):
            int_list(bad)


def test_ratios_by_hand():
    from slimrec.bench.timing import ratios

    def row(variant, ms):
        return {
            "variant": variant,
            "batch": 1,
            "threads": 1,
            "stages": {"total": {"median_ms": ms, "p99_ms": 2 * ms}},
        }

    # compressed 1 ms vs full 4 ms: 0.25 at the median and at p99 (2 / 8).
    assert ratios([row("full", 4.0), row("compressed", 1.0)]) == [
        {"batch": 1, "threads": 1, "stages": {"total": {"median": 0.25, "p99": 0.25}}}
    ]


def test_training_view_samples_rows_but_keeps_every_id_row(ml100k):
    from slimrec.bench.scale_models import training_view
    from slimrec.models.features import build_feature_space
    from slimrec.models.fold import FIT_TRAIN_VALID, Fold
    from slimrec.models.split import protocol_split

    fold = Fold.create(FIT_TRAIN_VALID, ml100k, protocol_split(ml100k), build_feature_space(ml100k, 20))
    view = training_view(fold, 1000, np.random.default_rng(0))
    assert len(view.fit_positions) == 1000 and np.isin(view.fit_positions, fold.fit_positions).all()
    assert len(fold.fit_positions) > 1000  # the original is untouched
    assert view.tables["item_rows"] is fold.tables["item_rows"]
    assert np.array_equal(view.fit_counts, fold.fit_counts)
    assert training_view(fold, None, np.random.default_rng(0)).fit_positions is fold.fit_positions


def test_same_build_tolerates_a_longer_grid_only_where_tuning_had_stopped():
    from slimrec.bench.scale import same_build

    def params(grid):
        return {"size": {"n_items": 10}, "config": {"seed": 0, "nprobe_grid": grid}}

    def record(grid, walked, last_recall):
        tuning = [{"nprobe": n, "recall": 0.5} for n in walked]
        tuning[-1]["recall"] = last_recall
        return {"params": params(grid), "index": {"compressed": {"tuning": tuning, "target_recall": 0.9}}}

    reached = record([1, 4, 16], [1, 4], 0.95)  # stopped at 4: a longer grid would stop there too
    assert same_build(reached, params([1, 4, 16])) and same_build(reached, params([1, 4, 16, 64]))
    missed = record([1, 4, 16], [1, 4, 16], 0.8)  # ran out of grid: a longer one would go further
    assert not same_build(missed, params([1, 4, 16, 64])) and same_build(missed, params([1, 4, 16]))
    assert not same_build(reached, {**params([1, 4, 16]), "size": {"n_items": 11}})
    other_seed = {"size": {"n_items": 10}, "config": {"seed": 1, "nprobe_grid": [1, 4, 16]}}
    assert not same_build(reached, other_seed)
