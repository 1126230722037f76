"""`slimrec replay` through real servers on ml-100k's whole test fold (a tiny teacher in both
arms, 50/50), then the report read back from the servers' own logs: no failed request, the
report's hit rates equal an offline join written here, and the sample-ratio check passes on the
real 50/50 log and fires when 30% of one arm's exposures are dropped."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from slimrec.experiment.report import build_report
from slimrec.serving.eventlog import read_log
from slimrec.serving.router import assign_variant

from slimrec.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def replayed(tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("replay")
    code = main(
        [
            "replay",
            "--data",
            "ml-100k",
            "--start",
            f"full={tiny_teacher},compressed={tiny_teacher}",
            "--split",
            "full=50,compressed=50",
            "--concurrency",
            "8",
            "--out",
            str(out),
        ]
    )
    return code, out, read_log(out / "logs")


def offline_hit_rates(records: list[dict], window: int = 10, k: int = 10) -> dict[str, float]:
    """The join, the slow obvious way: for each event, walk back over the user's exposures."""
    events: dict[str, dict] = {}
    for r in records:
        if r["kind"] == "event":
            events.setdefault(r["event_id"], r)
    by_user = defaultdict(list)
    for e in events.values():
        by_user[e["user_id"]].append(e)
    exposures = [r for r in records if r["kind"] == "exposure"]
    hit = [False] * len(exposures)
    for user, user_events in by_user.items():
        user_events.sort(key=lambda e: (e["time"], e["logged_at"]))
        mine = [i for i, x in enumerate(exposures) if x["user_id"] == user]
        for e in user_events:
            shown = [
                i
                for i in mine
                if (exposures[i]["time"], exposures[i]["logged_at"]) <= (e["time"], e["logged_at"])
                and e["item_id"] in [it["item_id"] for it in exposures[i]["items"][:k]]
            ]
            if not shown:
                continue
            latest = max(shown, key=lambda i: (exposures[i]["time"], exposures[i]["logged_at"]))
            after = [
                f
                for f in user_events
                if (f["time"], f["logged_at"]) >= (exposures[latest]["time"], exposures[latest]["logged_at"])
            ]
            if after.index(e) < window:
                hit[latest] = True
    rates = defaultdict(list)
    for x, h in zip(exposures, hit, strict=True):
        rates[x["arm"]].append(h)
    return {arm: sum(v) / len(v) for arm, v in rates.items()}


def test_the_whole_test_fold_replays_without_a_failure(replayed, ml100k):
    code, out, log = replayed
    assert code == 0
    exposures = [r for r in log.records if r["kind"] == "exposure"]
    assert len(exposures) == len([r for r in log.records if r["kind"] == "event"]) > 9000
    assert log.stats.corrupt_lines == 0 and log.stats.torn_tails == 0
    users = {r["user_id"] for r in exposures}
    assert len(users) == ml100k.n_users
    assert all(
        r["arm"] == assign_variant(r["user_id"], {"full": 50, "compressed": 50}, "slimrec-ab-1")
        for r in exposures
    )
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.png").is_file()


def test_the_reports_hit_rates_equal_an_offline_join_of_the_same_logs(replayed):
    _, _, log = replayed
    report = build_report(log.records, bootstrap=50)
    offline = offline_hit_rates(log.records)
    assert set(offline) == set(report["arms"]) == {"full", "compressed"}
    for arm, rate in offline.items():
        assert report["arms"][arm]["hit_rate"]["value"] == pytest.approx(rate, abs=1e-12)
    assert 0.02 < offline["full"] < 0.9  # the tiny model does hit: the join is not vacuous


def test_sample_ratio_passes_at_50_50_and_fires_when_an_arms_exposures_go_missing(replayed):
    _, _, log = replayed
    fair = build_report(log.records, bootstrap=50)["srm"]
    assert [check["srm"] for check in fair] == [False]
    rng = random.Random(0)
    dropped = [
        r
        for r in log.records
        if not (r["kind"] == "exposure" and r["arm"] == "compressed" and rng.random() < 0.3)
    ]
    unfair = build_report(dropped, bootstrap=50)["srm"]
    assert [check["srm"] for check in unfair] == [True]
