"""slimrec experiment report: the join against a brute-force oracle, rates against offline counts,
sample-ratio checks on logs routed by the real router, paired and unpaired differences, the CLI."""

from __future__ import annotations

import math

import numpy as np
import orjson
import pytest
from scipy import stats
from slimrec.experiment.join import join_exposures, parse_exposures
from slimrec.experiment.report import build_report, sample_ratio_checks
from slimrec.experiment.report_render import write_report
from slimrec.serving.router import assign_variant

from slimrec.cli import main

SALT = "slimrec-ab-1"


def exposure(user, arm, time, items, *, logged_at, host="h", pid=1, split_version=1, fallback=None):
    return {
        "kind": "exposure",
        "time": float(time),
        "logged_at": float(logged_at),
        "request_id": f"r-{user}-{arm}-{logged_at}",
        "user_id": user,
        "arm": arm,
        "variant": arm,
        "model_version": f"{arm}-1",
        "split_version": split_version,
        "fallback": fallback,
        "k": len(items),
        "items": [{"item_id": i, "position": p, "score": 1.0 / p} for p, i in enumerate(items, start=1)],
        "latency_ms": 4.0 + (logged_at % 3),
        "host": host,
        "pid": pid,
    }


def event(event_id, user, item, time, *, logged_at, host="h", pid=1):
    return {
        "kind": "event",
        "time": float(time),
        "logged_at": float(logged_at),
        "event_id": event_id,
        "user_id": user,
        "item_id": item,
        "type": "rating",
        "request_id": None,
        "known_item": True,
        "in_history": True,
        "host": host,
        "pid": pid,
    }


def split(version, weights, *, host="h", pid=1, logged_at=0.0):
    return {
        "kind": "split",
        "time": logged_at,
        "logged_at": logged_at,
        "version": version,
        "weights": weights,
        "source": "startup",
        "host": host,
        "pid": pid,
    }


# --- the join -----------------------------------------------------------------------------------


def oracle_credits(records: list[dict], window: int) -> list[set[str]]:
    """Credited items per exposure, straight from the definition by nested loops over everything."""
    exposures = [r for r in records if r["kind"] == "exposure"]
    copies: dict[str, list[dict]] = {}
    for r in records:
        if r["kind"] == "event":
            copies.setdefault(r["event_id"], []).append(r)
    first_seen = {event_id: n for n, event_id in enumerate(copies)}

    def after(event_copies, x):  # the event came after exposure x
        if event_copies[0]["time"] != x["time"]:
            return event_copies[0]["time"] > x["time"]
        same = [c for c in event_copies if (c["host"], c["pid"]) == (x["host"], x["pid"])]
        same = same or [c for c in event_copies if c["host"] == x["host"]] or event_copies
        return same[0]["logged_at"] >= x["logged_at"]

    def shown(x):
        return [i["item_id"] for i in x["items"]]

    credits: list[set[str]] = [set() for _ in exposures]
    for n, x in enumerate(exposures):
        following = [c for c in copies.values() if c[0]["user_id"] == x["user_id"] and after(c, x)]
        following.sort(key=lambda c: (c[0]["time"], c[0]["logged_at"], first_seen[c[0]["event_id"]]))
        for c in following[:window]:
            item = c[0]["item_id"]
            if item not in shown(x):
                continue
            earlier = [
                m
                for m, y in enumerate(exposures)
                if (y["user_id"], y["arm"]) == (x["user_id"], x["arm"]) and item in shown(y) and after(c, y)
            ]
            latest = max(earlier, key=lambda m: (exposures[m]["time"], exposures[m]["logged_at"], m))
            if latest == n:
                credits[n].add(item)
    return credits


def credited_items(outcome) -> set[str]:
    return {outcome.exposure.items[p - 1] for p in outcome.credited_positions}


def test_join_by_hand():
    # Window 2. x1 (t=10) shows a b c; x2 (t=20) shows a d.
    #   e0 t=10 logged before x1 (b): before the exposure, no credit
    #   e1 t=10 logged after x1 (a): x1's first event after it -> credits x1 (a at position 1)
    #   e2 t=25 (a), logged twice (two servers): x2 is the latest showing a -> credits x2, not x1
    #   e3 t=26 (c): x1 is the latest showing c, but x1's next 2 events are e1, e2 -> no credit
    records = [
        event("e0", "u", "b", 10, logged_at=99),
        exposure("u", "A", 10, ["a", "b", "c"], logged_at=100),
        event("e1", "u", "a", 10, logged_at=101),
        exposure("u", "A", 20, ["a", "d"], logged_at=102),
        event("e2", "u", "a", 25, logged_at=103),
        event("e2", "u", "a", 25, logged_at=104, host="other"),
        event("e3", "u", "c", 26, logged_at=105),
    ]
    x1, x2 = join_exposures(
        [r for r in records if r["kind"] == "exposure"],
        [r for r in records if r["kind"] == "event"],
        window=2,
    )
    assert (x1.credited_positions, x2.credited_positions) == ((1,), (1,))
    assert (x1.relevant, x2.relevant) == (1, 2)  # x1's window: e1, e2 (item a); x2's: e2, e3 (a, c)
    assert x2.ndcg_at(10) == pytest.approx(1 / (1 + 1 / math.log2(3)))  # one hit at 1 of 2 relevant
    assert x1.hit_at(1) and x1.ndcg_at(10) == 1.0


def random_log(seed: int, users: int = 4, steps: int = 14, pool: int = 6) -> list[dict]:
    """A small paired-style log full of ties: two servers (their own hosts and wall clocks) log
    their arm's exposures and every event; integer times collide, items repeat, lists overlap."""
    rng = np.random.default_rng(seed)
    servers = {"A": ("ha", 1, 1_000.0), "B": ("hb", 2, 5_000.0)}  # B plays the users later
    logs: dict[str, list[dict]] = {"A": [], "B": []}
    clock = {"A": 1_000.0, "B": 5_000.0}
    for u in range(users):
        user, arms = f"u{u}", ["A", "B"] if u % 3 else ["A"]
        times = np.sort(rng.integers(0, 8, size=steps))
        for s, t in enumerate(times):
            kind = rng.choice(["exposure", "event", "event"])
            item = f"i{rng.integers(pool)}"
            shown = [f"i{i}" for i in rng.choice(pool, size=3, replace=False)]
            for arm in arms:
                host, pid, _ = servers[arm]
                clock[arm] += float(rng.integers(1, 3))  # integer steps: some logged_at ties too
                if kind == "exposure":
                    logs[arm].append(exposure(user, arm, t, shown, logged_at=clock[arm], host=host, pid=pid))
                else:
                    logs[arm].append(
                        event(f"e{u}-{s}", user, item, t, logged_at=clock[arm], host=host, pid=pid)
                    )
    return logs["A"] + logs["B"]  # as read back: one segment per server


@pytest.mark.parametrize("window", [1, 2, 3, 10])
def test_join_agrees_with_a_brute_force_oracle(window):
    for seed in range(12):
        records = random_log(seed)
        exposures = [r for r in records if r["kind"] == "exposure"]
        outcomes = join_exposures(exposures, [r for r in records if r["kind"] == "event"], window)
        assert [credited_items(o) for o in outcomes] == oracle_credits(records, window), f"seed {seed}"


def test_hit_rate_equals_the_offline_count():
    records = random_log(seed=7, users=9, steps=20)
    k = 2
    report = build_report(records, window=3, k=k, bootstrap=50)
    exposures = [r for r in records if r["kind"] == "exposure"]
    credits = oracle_credits(records, window=3)
    for arm in ("A", "B"):
        mine = [(x, c) for x, c in zip(exposures, credits, strict=True) if x["arm"] == arm]
        hits = sum(any(i["item_id"] in c for i in x["items"][:k]) for x, c in mine)
        assert report["arms"][arm]["exposures"] == len(mine)
        assert report["arms"][arm]["users"] == len({x["user_id"] for x, _ in mine})
        assert report["arms"][arm]["hit_rate"]["value"] == pytest.approx(hits / len(mine), abs=1e-12)
        assert hits > 0


# --- sample ratio and differences ----------------------------------------------------------------


def routed_log(users: int, *, hit: dict[str, float], seed: int = 0) -> list[dict]:
    """An A/B log routed by the real router: geometric exposures per user (mean 10), each exposure
    followed by the user's event, which the list holds with probability hit[arm]."""
    weights = {"full": 50.0, "compressed": 50.0}
    rng = np.random.default_rng(seed)
    records, wall = [split(1, weights)], 0.0
    for u in range(users):
        user = f"user-{u}"
        arm = assign_variant(user, weights, SALT)
        for s in range(int(rng.geometric(0.1))):
            wall += 1.0
            target = f"t{u}-{s}"
            items = [f"i{i}" for i in rng.choice(500, size=10, replace=False)]
            if rng.random() < hit[arm]:
                items[int(rng.integers(10))] = target
            fallback = "popular" if rng.random() < 0.05 else None
            records.append(exposure(user, arm, 1e6 + s, items, logged_at=wall, fallback=fallback))
            records.append(event(f"{user}-{s}", user, target, 1e6 + s, logged_at=wall + 0.5))
    return records


@pytest.fixture(scope="module")
def ab_log() -> list[dict]:
    return routed_log(2000, hit={"full": 0.30, "compressed": 0.36})


def srm_of(records: list[dict]) -> dict:
    (check,) = build_report(records, bootstrap=20)["srm"]
    assert check["status"] == "checked"
    return check


def test_a_fair_split_passes_both_sample_ratio_checks(ab_log):
    check = srm_of(ab_log)
    assert check["users_p_value"] > 0.001 and check["exposures_p_value"] > 0.001 and not check["srm"]
    assert sum(check["users"].values()) == 2000


def test_losing_exposures_of_one_arm_fires_the_exposure_check(ab_log):
    rng = np.random.default_rng(1)
    lossy = [r for r in ab_log if not (r.get("arm") == "compressed" and rng.random() < 0.3)]
    check = srm_of(lossy)
    assert check["exposures_p_value"] < 0.001 and check["srm"]


def test_losing_users_of_one_arm_fires_the_users_check(ab_log):
    rng = np.random.default_rng(2)
    routed = {r["user_id"]: r["arm"] for r in ab_log if r["kind"] == "exposure"}
    lost = {u for u, arm in routed.items() if arm == "compressed" and rng.random() < 0.3}
    check = srm_of([r for r in ab_log if r.get("user_id") not in lost])
    assert check["users_p_value"] < 0.001 and check["srm"]


def test_the_exposure_check_allows_for_users_with_many_exposures():
    # Ten fair splits, users with geometric exposure counts (mean 10): a chi-square on exposure
    # counts treats exposures as independent and cries wolf on about half of them (its variance
    # is ~19x too small here); the user-clustered check stays quiet.
    weights = {"full": 50.0, "compressed": 50.0}
    naive_alarms = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        records = [split(1, weights)]
        for u in range(1000):
            user = f"s{seed}-user-{u}"
            arm = assign_variant(user, weights, SALT)
            records += [exposure(user, arm, s, ["i0"], logged_at=s) for s in range(int(rng.geometric(0.1)))]
        (check,) = sample_ratio_checks(parse_exposures(records[1:]), records[:1])
        assert not check["srm"], f"seed {seed}: {check}"
        counts = list(check["exposures"].values())
        naive_alarms += stats.chisquare(counts).pvalue < 0.001
    assert naive_alarms >= 2


def test_an_unpaired_difference_on_a_routed_log(ab_log):
    report = build_report(ab_log, bootstrap=500)
    assert report["design"] == "unpaired" and report["baseline"] == "full"
    (diff,) = report["differences"]
    arms = report["arms"]
    assert diff["analysis"] == "unpaired" and diff["user_overlap"] == 0.0
    assert diff["hit_rate"]["difference"] == pytest.approx(
        arms["compressed"]["hit_rate"]["value"] - arms["full"]["hit_rate"]["value"]
    )
    assert 0 < diff["hit_rate"]["low"] < diff["hit_rate"]["difference"] < diff["hit_rate"]["high"]
    assert diff["hit_rate"]["p_value"] < 0.05 and diff["hit_rate"]["verdict"] == "higher"
    for arm in arms.values():
        assert arm["hit_rate"]["low"] < arm["hit_rate"]["value"] < arm["hit_rate"]["high"]
        assert 0.02 < arm["fallback_share"] < 0.08


def paired_log(users: int, hit: dict[str, float], seed: int) -> list[dict]:
    """`replay --paired`: each arm its own server (host, wall clock), every user through both;
    the event after each exposure has the exposure's time and is logged by both servers."""
    rng = np.random.default_rng(seed)
    servers = {"full": ("host-full", 10, 1e6), "compressed": ("host-compressed", 20, 2e6)}
    records = []
    for arm, (host, pid, wall) in servers.items():
        records.append(split(1, {arm: 100.0}, host=host, pid=pid, logged_at=wall))
        for u in range(users):
            for s in range(8):
                wall += 1.0
                target = f"t{u}-{s}"
                items = [f"i{i}" for i in rng.choice(200, size=10, replace=False)]
                if rng.random() < hit[arm]:
                    items[int(rng.integers(10))] = target
                t = 5e5 + 100 * u + s
                records.append(exposure(f"u{u}", arm, t, items, logged_at=wall, host=host, pid=pid))
                records.append(
                    event(f"e{u}-{s}", f"u{u}", target, t, logged_at=wall + 0.5, host=host, pid=pid)
                )
    return records


def test_paired_replay_detects_the_better_arm():
    report = build_report(paired_log(300, {"full": 0.3, "compressed": 0.45}, seed=3), bootstrap=500)
    assert report["design"] == "paired"
    (diff,) = report["differences"]
    assert diff["analysis"] == "paired" and diff["users"] == 300
    assert 0 < diff["hit_rate"]["low"] and diff["hit_rate"]["p_value"] < 0.05
    assert diff["p_value_test"].startswith("sign-flip")
    # the event copy from the other server (logged long before) must not hide the same-time credit
    assert report["arms"]["compressed"]["hit_rate"]["value"] == pytest.approx(0.45, abs=0.04)
    assert all(s["status"] == "skipped" for s in report["srm"])
    assert report["log"]["duplicate_event_records"] == 300 * 8


def test_an_a_a_paired_log_finds_no_difference():
    report = build_report(paired_log(300, {"full": 0.4, "compressed": 0.4}, seed=4), bootstrap=500)
    (diff,) = report["differences"]
    assert diff["analysis"] == "paired"
    for metric in ("hit_rate", "ndcg"):
        assert diff[metric]["low"] < 0 < diff[metric]["high"]
        assert diff[metric]["p_value"] > 0.05


# --- the command -----------------------------------------------------------------------------------


def write_segment(path, records, torn: bytes = b"") -> None:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + torn)


def test_cli_report_end_to_end(tmp_path, capsys):
    records = routed_log(200, hit={"full": 0.3, "compressed": 0.4}, seed=5)
    logs = tmp_path / "logs"
    logs.mkdir()
    half = len(records) // 2
    write_segment(logs / "a-0001.jsonl", records[:half])
    write_segment(logs / "b-0001.jsonl", records[half:], torn=b'{"kind": "event", "ti')  # killed mid-write
    assert main(["experiment", "report", str(logs), "--bootstrap", "200", "--window", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# A/B outcome report") and "## Sample-ratio mismatch" in out
    written = logs / "report"
    assert (written / "report.md").read_text() == out
    assert (written / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = orjson.loads((written / "report.json").read_bytes())
    assert report["log"]["read"]["segments"] == 2 and report["log"]["read"]["torn_tails"] == 1
    assert report["log"]["exposures"] + report["log"]["events"] + 1 == len(records)
    assert report["parameters"]["window"] == 5
    assert report["arms"] == build_report(records, window=5, bootstrap=200)["arms"]


def test_cli_without_exposures_exits_2_naming_the_directory(tmp_path, capsys):
    empty = tmp_path / "empty-logs"
    empty.mkdir()
    assert main(["experiment", "report", str(empty)]) == 2
    assert str(empty) in capsys.readouterr().err
    assert main(["experiment", "report", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_write_report_returns_its_paths(tmp_path):
    report = build_report(random_log(0), window=3, bootstrap=20)
    paths = write_report(report, tmp_path / "deep" / "out")
    assert {p.name for p in paths.values()} == {"report.md", "report.json", "report.png"}
    assert all(p.is_file() for p in paths.values())
