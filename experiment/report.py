"""`slimrec experiment report`: which arm wins, judged by what users did after each exposure.

The server logs exposures (what an arm showed whom, and when) and events (what users did).
`join_exposures` credits each event to the exposure that led to it; `build_report` turns the
credited exposures into per-arm rates with bootstrap intervals over users, arm differences
(paired or unpaired, detected from the users), and sample-ratio checks per split version.
experiment/report_render.py writes it as report.md, report.json and report.png. The
definitions, stated once in DEFINITIONS, travel with every report.

    report = build_report(read_log(log_dir).records, window=10, k=10)
    write_report(report, log_dir / "report")          # experiment/report_render.py
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass, is_dataclass

import numpy as np
from slimrec.experiment.join import Exposure, ExposureOutcome, join_exposures

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
