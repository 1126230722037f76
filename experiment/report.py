"""`slimrec experiment report`: which arm wins, judged by what users did after each exposure.

The server logs exposures (what an arm showed whom, and when) and events (what users did).
`join_exposures` credits each event to the exposure that led to it; `build_report` turns the
credited exposures into per-arm rates with bootstrap intervals over users, arm differences
(paired or unpaired, detected from the users), and sample-ratio checks per split version.
`write_report` writes report.md, report.json and report.png. The definitions, stated once in
DEFINITIONS, travel with every report.

    report = build_report(read_log(log_dir).records, window=10, k=10)
    write_report(report, log_dir / "report")
"""

from __future__ import annotations

import math
import zlib
from bisect import bisect_left, bisect_right
from collections import defaultdict
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import numpy as np
import orjson

PAIRED_OVERLAP = 0.5  # share of the smaller arm's users also in the other arm: above it, arms are paired
SRM_ALPHA = 0.001
DEFINITIONS = {
    "credit": "an event of user u on item i is credited to the latest exposure of u in each arm, "
    "at or before the event, that showed i, if the event is among u's next WINDOW events after "
    "that exposure; events are counted once per event_id; at equal times an event counts as after "
    "an exposure when logged at or after it (wall clocks compared within one host)",
    "hit rate@k": "share of exposures with a credited item in the first min(k, list length) positions; "
    "every exposure counts, popularity fallbacks included",
    "NDCG@k": "binary relevance (credited items); DCG over the first min(k, list length) positions; "
    "IDCG = DCG of min(k, list length, R) hits at the top, R = the distinct items of the user's next "
    "WINDOW events after the exposure (the credited items are among them, so NDCG <= 1); 0 when R = 0. "
    "As PROTOCOL.md's NDCG (IDCG over min(k, relevant)), with the next WINDOW items as the relevant set",
    "coverage": "distinct items an arm showed / the log's catalogue: items shown by any arm or named "
    "by an event on a known item (the records carry no catalogue size)",
    "intervals": "95% percentile bootstrap over users: users resampled with replacement, "
    "rate = their hits (or NDCG sum) / their exposures",
    "difference": f"arm minus baseline ('full' if present, else the first arm by name; NAME-frozen arms "
    "against their own baseline, and NAME against NAME-frozen); paired when "
    f"over {PAIRED_OVERLAP:.0%} of the smaller arm's users are in both: users in both arms only, "
    "resampled together, p-value from a sign-flip permutation test (each user's two arms swapped at "
    "random); unpaired: each arm's users resampled apart, p-value from a permutation test of arm "
    "labels over users",
    "sample ratio": "per split version, arms of weight > 0: users per arm against the weights "
    "(chi-square; a user counts in the arm of their first exposure under that version) and exposures "
    "per arm against the weights with a user-clustered variance (each user in arm a with probability "
    "w_a: Var(E_a) = w_a (1 - w_a) sum_u e_u^2; chi-square with arms - 1 degrees of freedom, the "
    f"two-sided z-test for two arms); SRM when either p < {SRM_ALPHA}; skipped for paired arms",
}


# --- the join -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exposure:
    """One exposure record, its items by position; `order`: its place among the exposures."""

    order: int
    user_id: str
    arm: str
    time: float
    logged_at: float
    host: str
    pid: int
    items: tuple[str, ...]  # item at position 1, 2, ...
    record: dict

    @property
    def sort_key(self) -> tuple[float, float, int]:
        return (self.time, self.logged_at, self.order)


@dataclass(frozen=True)
class Event:
    """One event however many servers logged it; `copies`: each copy's (host, pid, logged_at)."""

    event_id: str
    user_id: str
    item_id: str
    time: float
    order: int  # the first copy's place among the events
    copies: tuple[tuple[str, int, float], ...]

    @property
    def sort_key(self) -> tuple[float, float, int]:
        return (self.time, self.copies[0][2], self.order)

    def logged_at_seen_by(self, host: str, pid: int) -> float:
        """When the exposure's own process (else its host, else anyone) logged this event: wall
        clocks compare only within one host, and paired servers log one event at different times."""
        on_host = None
        for copy_host, copy_pid, at in self.copies:
            if copy_host == host and copy_pid == pid:
                return at
            if copy_host == host and on_host is None:
                on_host = at
        return self.copies[0][2] if on_host is None else on_host


@dataclass(frozen=True)
class ExposureOutcome:
    """An exposure and what followed it: the positions of its credited items and R, the number of
    distinct items among the user's next `window` events (NDCG's ideal)."""

    exposure: Exposure
    credited_positions: tuple[int, ...]  # 1-based, ascending
    relevant: int

    def hit_at(self, k: int) -> bool:
        return bool(self.credited_positions) and self.credited_positions[0] <= k

    def ndcg_at(self, k: int) -> float:
        cut = min(k, len(self.exposure.items))
        ideal = sum(1 / math.log2(r + 1) for r in range(1, min(cut, self.relevant) + 1))
        gained = sum(1 / math.log2(p + 1) for p in self.credited_positions if p <= cut)
        return gained / ideal if ideal > 0 else 0.0


def parse_exposures(records: list[dict]) -> list[Exposure]:
    parsed = []
    for n, r in enumerate(records):
        items = sorted(r.get("items") or [], key=lambda item: item.get("position", 0))
        parsed.append(
            Exposure(
                order=n,
                user_id=str(r["user_id"]),
                arm=str(r["arm"]),
                time=float(r["time"]),
                logged_at=float(r.get("logged_at", r["time"])),
                host=str(r.get("host", "")),
                pid=int(r.get("pid", 0)),
                items=tuple(str(item["item_id"]) for item in items),
                record=r,
            )
        )
    return parsed


def dedupe_events(records: list[dict]) -> list[Event]:
    """One Event per event_id, in the order of first appearance, with every copy's logging time."""
    first: dict[str, dict] = {}
    copies: dict[str, list[tuple[str, int, float]]] = defaultdict(list)
    for r in records:
        key = str(r["event_id"])
        first.setdefault(key, r)
        copies[key].append(
            (str(r.get("host", "")), int(r.get("pid", 0)), float(r.get("logged_at", r["time"])))
        )
    return [
        Event(key, str(r["user_id"]), str(r["item_id"]), float(r["time"]), n, tuple(copies[key]))
        for n, (key, r) in enumerate(first.items())
    ]


def shown_before(exposure: Exposure, event: Event) -> bool:
    """The event came after the exposure: a later time, or the same time and logged at or after it."""
    if event.time != exposure.time:
        return event.time > exposure.time
    return event.logged_at_seen_by(exposure.host, exposure.pid) >= exposure.logged_at


def join_exposures(exposures: list[dict], events: list[dict], window: int) -> list[ExposureOutcome]:
    """Credit events to exposures (DEFINITIONS["credit"]); one outcome per exposure, in input order.

    Args:
        exposures: exposure records, in log order.
        events: event records, in log order; copies of one event_id (paired servers) count once.
        window: an event credits an exposure only if among the user's next `window` events after it.

    Returns:
        ExposureOutcome per exposure, aligned with `exposures`.

    Example:
        >>> x = {"user_id": "u", "arm": "a", "time": 1.0, "items": [{"item_id": "i", "position": 1}]}
        >>> e = {"event_id": "e", "user_id": "u", "item_id": "i", "time": 2.0}
        >>> join_exposures([x], [e], window=10)[0].credited_positions
        (1,)
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    events_of: dict[str, list[Event]] = defaultdict(list)
    for event in dedupe_events(events):
        events_of[event.user_id].append(event)
    shown_to: dict[tuple[str, str], list[Exposure]] = defaultdict(list)
    for exposure in parse_exposures(exposures):
        shown_to[exposure.user_id, exposure.arm].append(exposure)
    outcomes: list[ExposureOutcome | None] = [None] * len(exposures)
    for (user, _), shown in shown_to.items():
        user_events = sorted(events_of.get(user, []), key=lambda e: e.sort_key)
        for outcome in join_user(sorted(shown, key=lambda x: x.sort_key), user_events, window):
            outcomes[outcome.exposure.order] = outcome
    assert all(o is not None for o in outcomes)
    return outcomes  # type: ignore[return-value]


def join_user(shown: list[Exposure], events: list[Event], window: int) -> list[ExposureOutcome]:
    """The join for one user in one arm; both lists sorted by their sort_key."""
    event_times = [e.time for e in events]
    windows = [next_events(x, events, event_times, window) for x in shown]
    showing: dict[str, list[int]] = defaultdict(list)  # item -> exposures (indices of `shown`) showing it
    for n, x in enumerate(shown):
        for item in dict.fromkeys(x.items):
            showing[item].append(n)
    showing_times = {item: [shown[n].time for n in ns] for item, ns in showing.items()}
    credited: list[dict[str, int]] = [{} for _ in shown]
    for j, event in enumerate(events):
        latest = latest_showing(
            event, shown, showing.get(event.item_id, []), showing_times.get(event.item_id)
        )
        if latest is not None and j in windows[latest]:
            credited[latest].setdefault(event.item_id, shown[latest].items.index(event.item_id) + 1)
    return [
        ExposureOutcome(x, tuple(sorted(credited[n].values())), len({events[j].item_id for j in windows[n]}))
        for n, x in enumerate(shown)
    ]


def next_events(exposure: Exposure, events: list[Event], event_times: list[float], window: int) -> set[int]:
    """Indices of the user's first `window` events after the exposure."""
    picked: set[int] = set()
    for j in range(bisect_left(event_times, exposure.time), len(events)):
        if len(picked) == window:
            break
        if shown_before(exposure, events[j]):
            picked.add(j)
    return picked


def latest_showing(
    event: Event, shown: list[Exposure], ns: list[int], times: list[float] | None
) -> int | None:
    """The latest of the exposures `ns` (which show the event's item) at or before the event."""
    if not ns or times is None:
        return None
    for q in range(bisect_right(times, event.time) - 1, -1, -1):
        if shown_before(shown[ns[q]], event):
            return ns[q]
    return None


# --- statistics over users ----------------------------------------------------------------------


@dataclass(frozen=True)
class UserTotals:
    """One arm's exposures summed per user: sums[:, 0] hits@k, sums[:, 1] NDCG@k, and exposures."""

    users: list[str]
    sums: np.ndarray  # (U, 2)
    exposures: np.ndarray  # (U,)

    def rates(self) -> np.ndarray:
        return self.sums.sum(0) / self.exposures.sum()


METRICS = ("hit_rate", "ndcg")


def user_totals(outcomes: list[ExposureOutcome], k: int) -> dict[str, UserTotals]:
    """Per arm: each user's hits@k, NDCG@k sum and exposures, users sorted by id."""
    sums: dict[str, dict[str, list[float]]] = defaultdict(dict)
    for o in outcomes:
        row = sums[o.exposure.arm].setdefault(o.exposure.user_id, [0.0, 0.0, 0.0])
        row[0] += o.hit_at(k)
        row[1] += o.ndcg_at(k)
        row[2] += 1
    totals = {}
    for arm, by_user in sums.items():
        users = sorted(by_user)
        table = np.array([by_user[u] for u in users], dtype=np.float64).reshape(-1, 3)
        totals[arm] = UserTotals(users, table[:, :2], table[:, 2])
    return totals


def stream(seed: int, *names: str) -> np.random.Generator:
    """A generator per (seed, names): adding an arm leaves the other arms' intervals as they were."""
    return np.random.default_rng([seed, *(zlib.crc32(n.encode()) for n in names)])


def chunks(total: int, width: int) -> list[int]:
    """Row counts of chunks of `total` resamples over `width` users (~2M numbers each: bounded memory)."""
    step = max(1, 2_000_000 // max(width, 1))
    return [min(step, total - start) for start in range(0, total, step)]


def bootstrap_rates(arm: UserTotals, draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, 2) rates of users resampled with replacement."""
    out = []
    for b in chunks(draws, len(arm.users)):
        idx = rng.integers(0, len(arm.users), size=(b, len(arm.users)))
        out.append(arm.sums[idx].sum(1) / arm.exposures[idx].sum(1)[:, None])
    return np.concatenate(out)


def interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    return low, high


def p_value(null: np.ndarray, observed: np.ndarray) -> np.ndarray:
    """Two-sided permutation p-value per column, (1 + #|null| >= |observed|) / (1 + draws)."""
    extreme = np.abs(null) >= np.abs(observed) - 1e-12
    return (1 + extreme.sum(0)) / (1 + null.shape[0])


def paired_difference(base: UserTotals, arm: UserTotals, draws: int, rng: np.random.Generator) -> dict:
    """Users in both arms: the difference of rates, a bootstrap resampling users (both arms
    together) and a sign-flip test swapping each user's two arms at random."""
    common = sorted(set(base.users) & set(arm.users))
    a = rows_of(base, common)
    b = rows_of(arm, common)
    observed = b[0].sum(0) / b[1].sum() - a[0].sum(0) / a[1].sum()
    boots, nulls = [], []
    for n in chunks(draws, len(common)):
        idx = rng.integers(0, len(common), size=(n, len(common)))
        boots.append(
            b[0][idx].sum(1) / b[1][idx].sum(1)[:, None] - a[0][idx].sum(1) / a[1][idx].sum(1)[:, None]
        )
        flip = rng.random((n, len(common))) < 0.5
        sums_b = np.where(flip[..., None], a[0], b[0]).sum(1)
        sums_a = a[0].sum(0) + b[0].sum(0) - sums_b
        exp_b = np.where(flip, a[1], b[1]).sum(1)
        exp_a = a[1].sum() + b[1].sum() - exp_b
        nulls.append(sums_b / exp_b[:, None] - sums_a / exp_a[:, None])
    return summarise(
        observed, np.concatenate(boots), np.concatenate(nulls), len(common), "sign-flip permutation"
    )


def rows_of(arm: UserTotals, users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The arm's (sums, exposures) rows for `users`, in that order."""
    where = {u: n for n, u in enumerate(arm.users)}
    rows = [where[u] for u in users]
    return arm.sums[rows], arm.exposures[rows]


def unpaired_difference(base: UserTotals, arm: UserTotals, draws: int, rng: np.random.Generator) -> dict:
    """Disjoint users: each arm bootstrapped apart; p-value from permuting arm labels over users."""
    observed = arm.rates() - base.rates()
    boot = bootstrap_rates(arm, draws, rng) - bootstrap_rates(base, draws, rng)
    sums = np.concatenate([base.sums, arm.sums])
    exposures = np.concatenate([base.exposures, arm.exposures])
    labels = np.zeros(len(exposures), dtype=np.float64)
    labels[len(base.users) :] = 1.0
    nulls = []
    for n in chunks(draws, len(labels)):
        shuffled = rng.permuted(np.broadcast_to(labels, (n, len(labels))), axis=1)
        sums_b, exp_b = shuffled @ sums, shuffled @ exposures
        nulls.append(sums_b / exp_b[:, None] - (sums.sum(0) - sums_b) / (exposures.sum() - exp_b)[:, None])
    users = len(base.users) + len(arm.users)
    return summarise(observed, boot, np.concatenate(nulls), users, "permutation of arm labels over users")


def summarise(observed: np.ndarray, boot: np.ndarray, null: np.ndarray, users: int, test: str) -> dict:
    low, high = interval(boot)
    p = p_value(null, observed)
    out: dict = {"users": users, "p_value_test": test}
    for m, name in enumerate(METRICS):
        verdict = "higher" if low[m] > 0 else "lower" if high[m] < 0 else "no detectable difference"
        out[name] = {
            "difference": float(observed[m]),
            "low": float(low[m]),
            "high": float(high[m]),
            "p_value": float(p[m]),
            "verdict": verdict,
        }
    return out


FROZEN_SUFFIX = "-frozen"  # an arm served without live histories (replay --live-history both)


def user_overlap(a: UserTotals, b: UserTotals) -> float:
    """Share of the smaller arm's users also in the other arm."""
    return len(set(a.users) & set(b.users)) / max(1, min(len(a.users), len(b.users)))


def arms_in_order(arms) -> list[str]:
    """The baseline ('full' if present, else the first by name), then the others by name."""
    names = sorted(arms)
    return sorted(names, key=lambda a: a != ("full" if "full" in names else names[0]))


def comparison_pairs(names) -> list[tuple[str, str]]:
    """(baseline, arm) pairs: each arm against the baseline of its group (arms with live histories,
    and `NAME-frozen` arms, whose events were only logged), then each NAME against NAME-frozen:
    what reacting to the latest events gains (`slimrec replay --live-history both`)."""
    live = [n for n in names if not n.endswith(FROZEN_SUFFIX)]
    frozen = [n for n in names if n.endswith(FROZEN_SUFFIX)]
    pairs = []
    for group in (live, frozen):
        if group:
            baseline, *others = arms_in_order(group)
            pairs += [(baseline, arm) for arm in others]
    return pairs + [(name + FROZEN_SUFFIX, name) for name in live if name + FROZEN_SUFFIX in frozen]


def compare_arms(totals: dict[str, UserTotals], draws: int, seed: int) -> list[dict]:
    """Each of comparison_pairs, paired or unpaired as the users say."""
    rows = []
    for baseline, arm in comparison_pairs(totals):
        overlap = user_overlap(totals[baseline], totals[arm])
        paired = overlap > PAIRED_OVERLAP
        rng = stream(seed, "difference", baseline, arm)
        compare = paired_difference if paired else unpaired_difference
        row = {"arm": arm, "baseline": baseline, "analysis": "paired" if paired else "unpaired"}
        rows.append(row | {"user_overlap": overlap} | compare(totals[baseline], totals[arm], draws, rng))
    return rows


# --- sample-ratio mismatch ----------------------------------------------------------------------


def split_configurations(splits: list[dict]) -> list[dict]:
    """Distinct (version, weights) among the split records, in log order (restarts and worker
    processes log the same split again; paired servers log one version with different arms)."""
    seen: dict[tuple, dict] = {}
    for r in splits:
        weights = {str(a): float(w) for a, w in r["weights"].items()}
        key = (int(r["version"]), tuple(sorted(weights.items())))
        seen.setdefault(key, {"split_version": key[0], "weights": weights})
    return list(seen.values())


def sample_ratio_checks(exposures: list[Exposure], splits: list[dict]) -> list[dict]:
    """One check per split configuration with exposures (DEFINITIONS["sample ratio"])."""
    configs = split_configurations(splits)
    members: list[list[Exposure]] = [[] for _ in configs]
    unmatched: dict[int, int] = defaultdict(int)
    for x in exposures:
        version = int(x.record.get("split_version", -1))
        match = [
            n
            for n, c in enumerate(configs)
            if c["split_version"] == version and c["weights"].get(x.arm, 0) > 0
        ]
        if match:
            members[match[-1]].append(x)  # several: the last logged (a conflict, rare)
        else:
            unmatched[version] += 1
    checks = [check_split(c, xs) for c, xs in zip(configs, members, strict=True) if xs]
    for version, n in sorted(unmatched.items()):
        checks.append(
            {
                "split_version": version,
                "status": "skipped",
                "reason": f"{n} exposures with no split record "
                "giving their arm weight > 0 under this version",
                "srm": False,
            }
        )
    return checks


def check_split(config: dict, shown: list[Exposure]) -> dict:
    from scipy import stats

    arms = [a for a, w in config["weights"].items() if w > 0]
    out = config | {"arms": arms, "srm": False}
    if len(arms) < 2:
        return out | {"status": "skipped", "reason": "one arm with weight > 0 (a paired replay's server)"}
    arm_of: dict[str, str] = {}
    per_user: dict[str, int] = defaultdict(int)
    exposures_of: dict[str, int] = defaultdict(int)
    users_in: dict[str, set[str]] = defaultdict(set)
    for x in sorted(shown, key=lambda x: x.sort_key):
        arm_of.setdefault(x.user_id, x.arm)
        per_user[x.user_id] += 1
        exposures_of[x.arm] += 1
        users_in[x.user_id].add(x.arm)
    in_several = sum(len(a) > 1 for a in users_in.values())
    if in_several > PAIRED_OVERLAP * len(users_in):
        return out | {
            "status": "skipped",
            "reason": f"paired: {in_several} of {len(users_in)} users in several arms",
        }
    w = np.array([config["weights"][a] for a in arms])
    w = w / w.sum()
    users = np.array([sum(v == a for v in arm_of.values()) for a in arms], dtype=np.float64)
    users_p = float(stats.chisquare(users, users.sum() * w).pvalue)
    shown_n = np.array([exposures_of[a] for a in arms], dtype=np.float64)
    squares = float(sum(e * e for e in per_user.values()))
    statistic = float(((shown_n - w * shown_n.sum()) ** 2 / (w * squares)).sum())
    exposures_p = float(stats.chi2.sf(statistic, len(arms) - 1))
    return out | {
        "status": "checked",
        "users": {a: int(n) for a, n in zip(arms, users, strict=True)},
        "expected_share": {a: float(s) for a, s in zip(arms, w, strict=True)},
        "users_p_value": users_p,
        "exposures": {a: int(n) for a, n in zip(arms, shown_n, strict=True)},
        "exposures_p_value": exposures_p,
        "users_in_several_arms": in_several,
        "srm": min(users_p, exposures_p) < SRM_ALPHA,
    }


# --- the report ---------------------------------------------------------------------------------


def build_report(
    records: list[dict],
    *,
    window: int = 10,
    k: int = 10,
    bootstrap: int = 2000,
    seed: int = 0,
    read_stats: object | None = None,
) -> dict:
    """Judge the arms of a log: per-arm rates, differences, sample-ratio checks.

    Args:
        records: the log's records (`read_log(dir).records`): exposures, events, splits.
        window: an event credits an exposure only if among the user's next `window` events.
        k: hit rate@k and NDCG@k cut-off (capped at each list's length).
        bootstrap: resamples (and permutations) for intervals and p-values.
        seed: seeds every resample; the same log and seed give the same report.
        read_stats: `read_log(dir).stats` (segments, torn tails, ...), copied into the report.

    Returns:
        A JSON-ready dict: "arms", "differences", "srm", "log", "definitions", "parameters".
    """
    if k < 1 or bootstrap < 1:
        raise ValueError(f"k and bootstrap must be >= 1, got {k} and {bootstrap}")
    kinds: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        kinds[str(r.get("kind"))].append(r)
    if not kinds["exposure"]:
        raise ValueError("no exposure records in the log: nothing to judge")
    outcomes = join_exposures(kinds["exposure"], kinds["event"], window)
    totals = user_totals(outcomes, k)
    catalogue = log_catalogue(kinds["exposure"], kinds["event"])
    arms = {
        arm: arm_summary(
            arm, totals[arm], [o for o in outcomes if o.exposure.arm == arm], catalogue, bootstrap, seed
        )
        for arm in arms_in_order(totals)
    }
    differences = compare_arms(totals, bootstrap, seed)
    analyses = {d["analysis"] for d in differences}
    design = "single arm" if not analyses else analyses.pop() if len(analyses) == 1 else "mixed"
    distinct_events = len({r["event_id"] for r in kinds["event"]})
    return {
        "design": design,
        "baseline": next(iter(arms)),
        "parameters": {"window": window, "k": k, "bootstrap": bootstrap, "seed": seed},
        "arms": arms,
        "differences": differences,
        "srm": sample_ratio_checks([o.exposure for o in outcomes], kinds["split"]),
        "log": {
            "read": stats_dict(read_stats),
            "exposures": len(kinds["exposure"]),
            "events": distinct_events,
            "duplicate_event_records": len(kinds["event"]) - distinct_events,
            "split_records": len(kinds["split"]),
            "catalogue_items": len(catalogue),
        },
        "definitions": DEFINITIONS,
    }


def arm_summary(
    arm: str, totals: UserTotals, outcomes: list[ExposureOutcome], catalogue: set[str], draws: int, seed: int
) -> dict:
    rates = totals.rates()
    low, high = interval(bootstrap_rates(totals, draws, stream(seed, "arm", arm)))
    fallbacks: dict[str, int] = defaultdict(int)
    for o in outcomes:
        if o.exposure.record.get("fallback"):
            fallbacks[str(o.exposure.record["fallback"])] += 1
    shown = {item for o in outcomes for item in o.exposure.items}
    latency = [
        float(o.exposure.record["latency_ms"])
        for o in outcomes
        if o.exposure.record.get("latency_ms") is not None
    ]
    return {
        "users": len(totals.users),
        "exposures": len(outcomes),
        **{
            name: {"value": float(rates[m]), "low": float(low[m]), "high": float(high[m])}
            for m, name in enumerate(METRICS)
        },
        "items_shown": len(shown),
        "coverage": len(shown) / max(1, len(catalogue)),
        "fallback_share": sum(fallbacks.values()) / len(outcomes),
        "fallbacks": dict(fallbacks),
        "latency_ms": latency_percentiles(latency),
    }


def log_catalogue(exposures: list[dict], events: list[dict]) -> set[str]:
    """Items shown by any arm or named by an event on a known item."""
    shown = {str(item["item_id"]) for r in exposures for item in r.get("items") or []}
    return shown | {str(r["item_id"]) for r in events if r.get("known_item", True)}


def latency_percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def stats_dict(stats: object | None) -> dict:
    """read_log's stats as a plain dict (a dataclass, a dict or an object with attributes)."""
    if stats is None:
        return {}
    if is_dataclass(stats) and not isinstance(stats, type):
        return asdict(stats)
    return dict(stats) if isinstance(stats, dict) else dict(vars(stats))


# --- writing it ---------------------------------------------------------------------------------


def with_interval(m: dict, signed: bool = False) -> str:
    value = m["difference"] if signed else m["value"]
    sign = "+" if signed else ""
    return f"{value:{sign}.4f} [{m['low']:{sign}.4f}, {m['high']:{sign}.4f}]"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def shares(counts: dict[str, int]) -> str:
    total = max(1, sum(counts.values()))
    return ", ".join(f"{a} {n:,} ({n / total:.1%})" for a, n in counts.items())


def p_text(p: float, draws: int) -> str:
    """A permutation p-value; at its floor, 1 / (draws + 1), as a bound (no draw was as extreme)."""
    return f"<={p:.4f}" if p <= 1.5 / (draws + 1) else f"{p:.4f}"


DESIGNS = {
    "unpaired": "unpaired (each user in one arm)",
    "paired": "paired (the same users in every arm)",
    "mixed": "mixed (some arm pairs share their users)",
    "single arm": "single arm (nothing to compare)",
}


def render_markdown(report: dict) -> str:
    """The report as Markdown: arms, differences, sample ratio, the log, the definitions."""
    p, k = report["parameters"], report["parameters"]["k"]
    lines = [
        "# A/B outcome report",
        "",
        f"Design: **{DESIGNS[report['design']]}**; differences against `{report['baseline']}`. Credit window "
        f"{p['window']} events, k = {k}, {p['bootstrap']:,} bootstrap resamples over users, "
        f"seed {p['seed']}.",
        "",
        "## Arms",
        "",
        f"| arm | users | exposures | hit rate@{k} [95% CI] | NDCG@{k} [95% CI] | coverage (items) "
        "| fallback | latency p50 / p95 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, a in report["arms"].items():
        lat = a["latency_ms"]
        lines.append(
            f"| {name} | {a['users']:,} | {a['exposures']:,} | {with_interval(a['hit_rate'])} "
            f"| {with_interval(a['ndcg'])} | {a['coverage']:.1%} ({a['items_shown']:,}) "
            f"| {a['fallback_share']:.1%} "
            f"| {ms(lat['p50'])} / {ms(lat['p95'])} / {ms(lat['p99'])} |"
        )
    if report["differences"]:
        lines += [
            "",
            "## Differences (arm - baseline)",
            "",
            f"| arm - baseline | analysis | users | hit rate@{k} [95% CI] | p | NDCG@{k} [95% CI] | p "
            "| verdict |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for d in report["differences"]:
            verdicts = {d[m]["verdict"] for m in METRICS}
            verdict = verdicts.pop() if len(verdicts) == 1 else "mixed"
            hit_p, ndcg_p = (p_text(d[m]["p_value"], p["bootstrap"]) for m in METRICS)
            lines.append(
                f"| {d['arm']} - {d['baseline']} | {d['analysis']} (overlap {d['user_overlap']:.0%}) "
                f"| {d['users']:,} | {with_interval(d['hit_rate'], True)} | {hit_p} "
                f"| {with_interval(d['ndcg'], True)} | {ndcg_p} | {verdict} |"
            )
        tests = sorted({d["p_value_test"] for d in report["differences"]})
        lines += ["", f"p-values: {'; '.join(tests)}."]
    lines += ["", "## Sample-ratio mismatch", ""]
    lines += ["| split version | weights | users per arm | users p | exposures per arm | exposures p | SRM |"]
    lines += ["|---|---|---|---|---|---|---|"]
    for s in report["srm"]:
        weights = ", ".join(f"{a}={w:g}" for a, w in s.get("weights", {}).items())
        if s["status"] != "checked":
            lines.append(f"| {s['split_version']} | {weights} | skipped: {s['reason']} | | | | - |")
            continue
        lines.append(
            f"| {s['split_version']} | {weights} | {shares(s['users'])} | {s['users_p_value']:.3g} "
            f"| {shares(s['exposures'])} | {s['exposures_p_value']:.3g} | {'**SRM**' if s['srm'] else 'no'} |"
        )
    log = report["log"]
    lines += ["", "## Log", ""]
    read = ", ".join(f"{key.replace('_', ' ')} {value:,}" for key, value in log["read"].items())
    lines.append(f"Read: {read or 'not given'}.")
    lines.append(
        f"Exposures {log['exposures']:,}; events {log['events']:,} distinct "
        f"({log['duplicate_event_records']:,} duplicate records); split records {log['split_records']:,}; "
        f"catalogue items {log['catalogue_items']:,}."
    )
    if "replay" in report:
        lines.append(
            "Replay: " + ", ".join(f"{key} {value:,}" for key, value in report["replay"].items()) + "."
        )
    lines += ["", "## Definitions", ""]
    lines += [
        f"- **{name}**: {text.replace('WINDOW', str(p['window']))}."
        for name, text in report["definitions"].items()
    ]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> Path:
    """PNG: hit rate@k and NDCG@k per arm with their 95% intervals, and latency percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["arms"])
    arms = [report["arms"][n] for n in names]
    k = report["parameters"]["k"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    for ax, metric, label in zip(axes, METRICS, (f"hit rate@{k}", f"NDCG@{k}"), strict=False):
        values = np.array([a[metric]["value"] for a in arms])
        errors = np.array(
            [[v - a[metric]["low"], a[metric]["high"] - v] for v, a in zip(values, arms, strict=True)]
        )
        ax.bar(names, values, yerr=errors.T, capsize=6, color="tab:blue", alpha=0.8)
        ax.set_title(f"{label} (95% bootstrap CI over users)")
        ax.grid(True, axis="y", alpha=0.3)
    width = 0.8 / max(1, len(names))
    for i, (name, a) in enumerate(zip(names, arms, strict=True)):
        latency = [a["latency_ms"][q] or 0.0 for q in ("p50", "p95", "p99")]
        axes[2].bar(np.arange(3) + i * width, latency, width, label=name)
    axes[2].set_xticks(np.arange(3) + width * (len(names) - 1) / 2, ["p50", "p95", "p99"])
    axes[2].set_title("latency (ms)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(report: dict, out: Path) -> dict[str, Path]:
    """report.md, report.json and report.png in `out` (created); returns their paths by kind."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "report.md", "json": out / "report.json", "png": out / "report.png"}
    paths["markdown"].write_text(render_markdown(report))
    paths["json"].write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2) + b"\n")
    plot_report(report, paths["png"])
    return paths
