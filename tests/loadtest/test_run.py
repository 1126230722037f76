"""`slimrec loadtest` against real servers (the tiny teacher as "full" and "compressed"); the report builder.

Every run is a few seconds of real locust traffic: a local process, or 1 master + 1 worker, at
saturation or at a fixed rate, against a server started by the test or by the command itself.
The report builder and the workload samplers are checked by hand on small inputs.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
from serving_fixtures import running_server
from slimrec.loadtest import report as rep
from slimrec.loadtest.run import LoadConfig
from slimrec.loadtest.units import parse_duration
from slimrec.loadtest.workload import RequestMix, Workload, ZipfSampler, parse_k_mix

from slimrec.cli import main

VARIANTS = ("full", "compressed")


@pytest.fixture(scope="module")
def server(tiny_teacher, tmp_path_factory):
    variants = {"full": tiny_teacher, "compressed": tiny_teacher}
    with running_server(
        tmp_path_factory.mktemp("loadtest-server"), variants, "--split", "full=50,compressed=50"
    ) as srv:
        yield srv


def loadtest(out, *args: str) -> dict:
    # No warm-up: on a busy machine locust can take most of a short phase to start, and these
    # tests check the run and its report, not steady-state figures.
    assert (
        main(["loadtest", *args, "--users", "4", "--spawn-rate", "4", "--warmup", "0", "--out", str(out)])
        == 0
    )
    return json.loads((out / "loadtest-report.json").read_text())


def check_report(out, report: dict, phases: tuple[str, ...]) -> None:
    """Files exist and parse, both variants served traffic without failures, ratios come from the rows."""
    assert (out / "loadtest-latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "loadtest-report.md").read_text()
    rows = report["variants"]
    assert list(rows) == list(VARIANTS)
    for name in VARIANTS:
        row = rows[name]
        assert row["requests"] > 0 and row["failures"] == 0, row
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p95_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert f"| {name} | {row['requests']:,} | 0 |" in markdown
    ratios = report["ratios"]["compressed/full"]
    for metric in rep.RATIO_METRICS:
        if metric in rows["full"]:
            assert ratios[metric] == pytest.approx(rows["compressed"][metric] / rows["full"][metric])
        else:  # server CPU per variant: per-variant phases only
            assert metric == "cpu_us_per_request" and ratios[metric] is None
    for phase in phases:  # the server's CPU over every phase (a loopback server: its tree in /proc)
        cpu = report["phases"][phase]["server_cpu"]
        assert cpu["cpu_s"] > 0 and cpu["requests"] > 0 and cpu["us_per_request"] > 0, cpu
        if phase in rows:
            assert rows[phase]["cpu_us_per_request"] == cpu["us_per_request"]
    for phase in phases:
        with open(out / f"{phase}_stats.csv") as f:
            assert "Aggregated" in f.read()
        locust = report["phases"][phase]["locust"]  # locust's own counts: at least ours (no warm-up)
        assert locust["failures"] == 0 and locust["requests"] > 0
        for name in VARIANTS if phase == "ab" else (phase,) if phase in rows else ():
            assert locust["by_variant"][name] >= rows[name]["requests"]


def test_per_variant_against_a_running_server_with_ceiling(server, tmp_path):
    report = loadtest(
        tmp_path, "--host", server.url, "--mode", "per-variant", "--duration", "3s", "--ceiling"
    )
    check_report(tmp_path, report, ("full", "compressed", "ceiling"))
    assert report["phases"]["full"]["other_variants"] == {}  # the header forced every answer
    ceiling = report["ceiling"]
    assert ceiling["requests"] > 0 and ceiling["failures"] == 0
    assert report["ratios"]["compressed/ceiling"]["rps"] == pytest.approx(
        report["variants"]["compressed"]["rps"] / ceiling["rps"]
    )
    assert not any(os.path.exists(f"/proc/{s['pid']}") for s in report["servers"].values())


def test_ab_names_requests_by_the_variant_that_answered(server, tmp_path):
    report = loadtest(tmp_path, "--host", server.url, "--mode", "ab", "--duration", "3s")
    check_report(tmp_path, report, ("ab",))
    names = (tmp_path / "ab_stats.csv").read_text()
    assert "[full]" in names and "[compressed]" in names
    assert "RPS ratio is the split" in (tmp_path / "loadtest-report.md").read_text()


def test_start_serves_the_artifacts_and_stops_the_server(tiny_teacher, tmp_path):
    report = loadtest(
        tmp_path,
        "--start",
        f"full={tiny_teacher},compressed={tiny_teacher}",
        "--mode",
        "ab",
        "--duration",
        "2s",
        "--batcher",
        "off",
    )
    check_report(tmp_path, report, ("ab",))
    assert report["settings"]["host"].endswith("--batch-max-size 1")  # the server ran without its batcher
    server = report["servers"]["slimrec"]
    assert server["url"].startswith("http://127.0.0.1:")
    assert not os.path.exists(f"/proc/{server['pid']}")


def test_start_with_model_processes(tiny_teacher, tmp_path):
    report = loadtest(
        tmp_path,
        "--start",
        f"full={tiny_teacher},compressed={tiny_teacher}",
        "--mode",
        "ab",
        "--duration",
        "2s",
        "--model-process",
    )
    check_report(tmp_path, report, ("ab",))
    assert report["settings"]["host"].endswith("--model-process")
    assert not os.path.exists(f"/proc/{report['servers']['slimrec']['pid']}")


def test_master_and_one_worker(server, tmp_path):
    report = loadtest(tmp_path, "--host", server.url, "--mode", "ab", "--duration", "3s", "--workers", "1")
    check_report(tmp_path, report, ("ab",))
    assert report["settings"]["generators"] == "1 locust master + 1 worker"
    assert len(report["phases"]["ab"]["request_logs"]) == 1  # the worker sent the requests, not the master
    assert "Got quit message from master" in (tmp_path / "logs" / "locust-ab-worker0.log").read_text()


def test_fixed_rate_offers_the_target(server, tmp_path):
    report = loadtest(
        tmp_path, "--host", server.url, "--mode", "ab", "--duration", "4s", "--rate", "20", "--users", "8"
    )
    achieved = sum(row["rps"] for row in report["variants"].values())
    assert 10 <= achieved <= 30, achieved
    assert "at 20 RPS offered" in (tmp_path / "loadtest-report.md").read_text()
    # Arrivals spread over each user's period, not in bursts of every user at once: in bursts 7
    # of every 8 gaps between request starts were under a millisecond; at random phases two of
    # the 8 users land within 2 ms of each other now and then, but not half of them.
    starts = sorted(
        float(line.split(",")[0])
        for path in report["phases"]["ab"]["request_logs"]
        for line in Path(path).read_text().splitlines()[1:]
    )
    gaps = np.diff(starts)
    assert len(gaps) >= 30 and np.mean(gaps < 0.002) < 0.5, np.round(gaps, 4).tolist()


def test_request_cap_ends_a_phase_before_its_run_time(server, tmp_path):
    report = loadtest(
        tmp_path,
        "--host",
        server.url,
        "--mode",
        "ab",
        "--duration",
        "60s",
        "--warmup",
        "0s",
        "--max-requests",
        "40",
    )
    phase = report["phases"]["ab"]
    assert phase["seconds"] < 45, phase["seconds"]
    assert 40 <= phase["locust"]["requests"] <= 200
    # With no warm-up, the per-request logs hold exactly what locust counted.
    assert sum(row["requests"] for row in report["variants"].values()) == phase["locust"]["requests"]


def test_usage_errors_exit_2(tmp_path):
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--duration", "3s", "--warmup", "5s"]) == 2
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--split", "full=50"]) == 2
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--batcher", "off"]) == 2
    assert main(["loadtest", "--host", "http://127.0.0.1:9", "--model-process"]) == 2
    assert main(["loadtest", "--start", "full"]) == 2
    assert main(["loadtest", "--start", f"full={tmp_path / 'missing'}"]) == 2


# --- report builder, by hand ------------------------------------------------------------------

FULL = {
    "requests": 1000,
    "failures": 0,
    "rps": 200.0,
    "mean_ms": 12.0,
    "p50_ms": 10.0,
    "p90_ms": 20.0,
    "p95_ms": 25.0,
    "p99_ms": 40.0,
    "max_ms": 80.0,
    "cpu_us_per_request": 4000.0,
    "cores_busy": 0.8,
}
COMPRESSED = {
    "requests": 1500,
    "failures": 2,
    "rps": 300.0,
    "mean_ms": 6.0,
    "p50_ms": 5.0,
    "p90_ms": 10.0,
    "p95_ms": 20.0,
    "p99_ms": 30.0,
    "max_ms": 100.0,
    "cpu_us_per_request": 600.0,
    "cores_busy": 0.18,
}
CEILING = {
    "requests": 6000,
    "failures": 0,
    "rps": 1200.0,
    "mean_ms": 1.0,
    "p50_ms": 1.0,
    "p90_ms": 2.0,
    "p95_ms": 2.5,
    "p99_ms": 4.0,
    "max_ms": 9.0,
    "cpu_us_per_request": 75.0,
    "cores_busy": 0.09,
}


def test_build_report_ratios_by_hand():
    report = rep.build_report(
        {"full": FULL, "compressed": COMPRESSED}, {"mode": "per-variant", "users": 8}, ceiling=CEILING
    )
    assert report["ratios"]["compressed/full"] == {
        "cpu_us_per_request": pytest.approx(0.15),
        "rps": 1.5,
        "mean_ms": 0.5,
        "p50_ms": 0.5,
        "p90_ms": 0.5,
        "p95_ms": 0.8,
        "p99_ms": 0.75,
        "max_ms": 1.25,
    }
    # The ceiling is quoted by CPU per request (600 / 75), RPS kept beside it.
    assert report["ratios"]["compressed/ceiling"] == {"cpu_us_per_request": 8.0, "rps": 0.25}
    assert report["ratios"]["full/ceiling"] == {"cpu_us_per_request": 4000 / 75, "rps": 200 / 1200}
    # A missing or zero baseline gives no ratio rather than a crash or an infinity.
    assert rep.build_report({"full": FULL}, {})["ratios"] == {}
    assert rep.build_report({"full": FULL}, {}, candidate="full")["ratios"] == {}  # one variant served
    assert rep.ratios({"rps": 1.0, "p50_ms": math.nan}, {"rps": 0.0, "p50_ms": 1.0})["rps"] is None
    assert rep.ratios({"rps": 1.0, "p50_ms": math.nan}, {"rps": 0.0, "p50_ms": 1.0})["p50_ms"] is None


def test_render_markdown_table_by_hand():
    report = rep.build_report(
        {"full": FULL, "compressed": COMPRESSED},
        {"mode": "per-variant", "users": 8, "rate": 150.0},
        ceiling=CEILING,
    )
    lines = rep.render_markdown(report).splitlines()
    assert lines[0] == "# Load test: per-variant, 8 users, at 150 RPS offered"
    header = (
        "| variant | requests | failures | RPS | server CPU us/req | cores busy | p50 ms | p90 ms | p95 ms "
        "| p99 ms | max ms |"
    )
    table = lines.index(header)
    assert lines[table + 2 : table + 5] == [
        "| full | 1,000 | 0 | 200.0 | 4,000 | 0.80 | 10.00 | 20.00 | 25.00 | 40.00 | 80.00 |",
        "| compressed | 1,500 | 2 | 300.0 | 600 | 0.18 | 5.00 | 10.00 | 20.00 | 30.00 | 100.00 |",
        "| ceiling | 6,000 | 0 | 1,200.0 | 75 | 0.09 | 1.00 | 2.00 | 2.50 | 4.00 | 9.00 |",
    ]
    assert "| 0.150 | 1.500 | 0.500 | 0.500 | 0.500 | 0.800 | 0.750 | 1.250 |" in lines
    assert any("compressed/ceiling CPU/request 8.00x, RPS 0.250" in line for line in lines)


def test_phase_rows_from_a_request_log(tmp_path):
    # Six requests over 2 s; the first starts in the 0.5 s warm-up and is left out. Latencies of the
    # successful full requests: 10, 20, 30 -> p50 20, p90 28 (linear); compressed: one ok (5 ms), one failed.
    log = tmp_path / "requests-1.csv"
    log.write_text(
        "start_time,variant,name,response_ms,ok\n"
        "100.0,full,recommend known [full],999.0,1\n"
        "100.6,full,recommend known [full],10.0,1\n"
        "101.0,compressed,recommend known [compressed],5.0,1\n"
        "101.2,full,user recs [full],20.0,1\n"
        "101.5,compressed,recommend new-user [compressed],7.0,0\n"
        "102.57,full,recommend genre [full],30.0,1\n"
    )
    rows, latencies = rep.phase_rows(rep.read_request_log([log]), warmup_s=0.5)
    window = 102.6 - 100.6
    assert rows["full"]["requests"] == 3 and rows["full"]["failures"] == 0
    assert rows["full"]["rps"] == pytest.approx(3 / window)
    assert rows["full"]["p50_ms"] == pytest.approx(20.0) and rows["full"]["p90_ms"] == pytest.approx(28.0)
    assert rows["full"]["max_ms"] == 30.0 and rows["full"]["mean_ms"] == pytest.approx(20.0)
    assert rows["compressed"]["requests"] == 2 and rows["compressed"]["failures"] == 1
    assert rows["compressed"]["p99_ms"] == 5.0  # percentiles over successful requests only
    assert sorted(latencies["full"].tolist()) == [10.0, 20.0, 30.0]
    with pytest.raises(ValueError, match="warm-up"):
        rep.phase_rows(rep.read_request_log([log]), warmup_s=10.0)


def test_write_report_is_strict_json_with_a_png(tmp_path):
    rows = {"full": FULL, "compressed": rep.summarize([], 3, 3, 1.0)}  # every request failed: NaN latencies
    report = rep.build_report(rows, {"mode": "ab", "users": 2})
    latencies = {"full": np.array([1.0, 2.0, 3.0]), "compressed": np.array([])}
    paths = rep.write_report(tmp_path, report, latencies)
    data = json.loads(paths["json"].read_text())
    assert data["variants"]["compressed"]["p50_ms"] is None
    assert data["ratios"]["compressed/full"]["p50_ms"] is None
    assert "| compressed | 3 | 3 | 3.0 | n/a |" in paths["markdown"].read_text()
    assert paths["png"].stat().st_size > 1000


# --- workload and settings ---------------------------------------------------------------------


def test_zipf_sampler_follows_one_over_rank():
    sampler = ZipfSampler([str(i) for i in range(100)], exponent=1.0, seed=3)
    harmonic = sum(1 / r for r in range(1, 101))
    assert sampler.probability(0) == pytest.approx(1 / harmonic)
    assert sampler.probability(9) == pytest.approx(1 / 10 / harmonic)
    rng = random.Random(0)
    draws = [sampler.sample(rng) for _ in range(20_000)]
    top = draws.count(sampler.ids[0]) / len(draws)
    assert top == pytest.approx(1 / harmonic, rel=0.1)
    assert sampler.ids != [str(i) for i in range(100)]  # popularity is a shuffle, not id order
    assert ZipfSampler([str(i) for i in range(100)], seed=3).ids == sampler.ids  # same on every worker


def test_request_mix_shares_and_bodies():
    workload = Workload([str(i) for i in range(50)], [str(i) for i in range(200)], ["Drama", "Comedy"])
    mix = RequestMix(new_user_share=0.3, genre_share=0.5, k_mix="10:1,50:1")
    rng = random.Random(1)
    users, items = ZipfSampler(workload.user_ids), ZipfSampler(workload.item_ids)
    drawn = [mix.draw(rng, workload, users, items) for _ in range(4000)]
    kinds = [kind for kind, _ in drawn]
    assert kinds.count("new-user") / len(kinds) == pytest.approx(0.3, abs=0.03)
    assert kinds.count("genre") / len(kinds) == pytest.approx(0.7 * 0.5, abs=0.03)
    for kind, body in drawn:
        assert body["k"] in (10, 50)
        if kind == "new-user":
            assert body["user_id"] not in workload.user_ids and 1 <= len(body["history"]) <= 20
            assert set(body["history"]) <= set(workload.item_ids)
        else:
            assert body["user_id"] in workload.user_ids
        if kind == "genre":
            assert (body.get("include_genres") or body.get("exclude_genres"))[0] in workload.genres


def test_workload_round_trip_and_catalogue(tiny_teacher, tmp_path):
    workload = Workload.from_catalogue(tiny_teacher)
    assert len(workload.user_ids) == 943 and len(workload.item_ids) == 1682
    assert "Drama" in workload.genres and "unknown" not in workload.genres
    assert Workload.load(workload.save(tmp_path / "w.json")) == workload


def test_settings_parsing_and_validation():
    assert parse_k_mix("10:70,20:30") == ([10, 20], [70.0, 30.0])
    with pytest.raises(ValueError, match="k mix"):
        parse_k_mix("ten:1")
    assert [parse_duration(t) for t in ("60s", "2m", "1m30s", "45", "0.5s")] == [60, 120, 90, 45, 0.5]
    assert [parse_duration(t) for t in ("250ms", "1h", "1M 30S", "0")] == [0.25, 3600, 90, 0]
    for bad in ("3 parsecs", "", "-5", "1e3", "inf", "m", "1m30", "1.s"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    config = LoadConfig(users=8, spawn_rate=4, duration_s=30, rate=100)
    assert config.warmup_s == 2.0 and config.max_requests == math.ceil(100 * 1.5 * 30) + 100
    with pytest.raises(ValueError, match="--mode"):
        LoadConfig(mode="shadow")
    with pytest.raises(ValueError, match="--rate"):
        LoadConfig(rate=0)
