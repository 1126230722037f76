"""Load-test report: per-variant rows from the per-request logs, compressed/full ratios, markdown, JSON, PNG.

A row is one variant's figures over one measured window:
    {"requests", "failures", "rps", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms", "seconds",
     "cpu_us_per_request", "cores_busy", "generator_cpu_us_per_request"}
Percentiles are exact (numpy, linear interpolation) over the successful requests' latencies as the
load generator saw them; locust's own CSVs (bucketed percentiles) and totals are kept for reference.
With wrk they are wrk's (its histogram). The server's CPU per request and cores busy (loadtest.cpu)
are there when the server's CPU could be read; the ceiling is quoted by CPU per request. With wrk,
the generator's own CPU per request too (the runner's reaped children around its run).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

PERCENTILES = (50, 90, 95, 99)
OPTIONAL = {"generator_cpu_us_per_request"}  # a column only when some row has it (wrk phases)
RATIO_METRICS = ("cpu_us_per_request", "rps", "mean_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "max_ms")
COLUMNS = (
    ("requests", "requests", "{:,}"),
    ("failures", "failures", "{:,}"),
    ("rps", "RPS", "{:,.1f}"),
    ("cpu_us_per_request", "server CPU us/req", "{:,.0f}"),
    ("cores_busy", "cores busy", "{:.2f}"),
    ("generator_cpu_us_per_request", "generator CPU us/req", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p95_ms", "p95 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.2f}"),
)


def read_request_log(paths) -> dict[str, np.ndarray]:
    """Per-request CSVs (locustfile.RequestLog) -> columns: start (s), variant, response_ms, ok."""
    start, variant, ms, ok = [], [], [], []
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                start.append(float(row["start_time"]))
                variant.append(row["variant"])
                ms.append(float(row["response_ms"]))
                ok.append(row["ok"] == "1")
    return {
        "start": np.asarray(start, dtype=float),
        "variant": np.asarray(variant, dtype=object),
        "response_ms": np.asarray(ms, dtype=float),
        "ok": np.asarray(ok, dtype=bool),
    }


def summarize(latencies_ms, requests: int, failures: int, seconds: float) -> dict:
    """One row: counts, RPS over `seconds`, mean and percentiles of `latencies_ms` (successful requests)."""
    values = np.asarray(latencies_ms, dtype=float)
    row = {
        "requests": int(requests),
        "failures": int(failures),
        "rps": requests / seconds if seconds > 0 else 0.0,
        "seconds": float(seconds),
    }
    if values.size:
        row["mean_ms"] = float(values.mean())
        cuts = np.percentile(values, PERCENTILES)
        row.update({f"p{p}_ms": float(v) for p, v in zip(PERCENTILES, cuts, strict=True)})
        row["max_ms"] = float(values.max())
    else:
        row.update({key: math.nan for key in ("mean_ms", *(f"p{p}_ms" for p in PERCENTILES), "max_ms")})
    return row


def phase_rows(
    log: dict[str, np.ndarray], warmup_s: float = 0.0
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Rows per variant for one phase, requests that started in the first `warmup_s` seconds left out.

    The window runs from the first kept request's start to the last one's end, shared by every
    variant of the phase, so in an A/B phase the RPS of each variant is its share of the total.
    Returns (rows by variant, successful latencies by variant).
    """
    if log["start"].size == 0:
        return {}, {}
    keep = log["start"] >= log["start"].min() + warmup_s
    if not keep.any():
        raise ValueError(f"warm-up of {warmup_s:.1f} s leaves no requests; shorten it or run longer")
    start, variant, ms, ok = (log[key][keep] for key in ("start", "variant", "response_ms", "ok"))
    seconds = float((start + ms / 1000).max() - start.min())
    rows, latencies = {}, {}
    for name in sorted(set(variant.tolist())):
        mine = variant == name
        latencies[name] = ms[mine & ok]
        rows[name] = summarize(latencies[name], int(mine.sum()), int((mine & ~ok).sum()), seconds)
    return rows, latencies


def measured_window(log: dict[str, np.ndarray], warmup_s: float = 0.0) -> tuple[float, float, np.ndarray]:
    """(start, end, request ends) of the window phase_rows measures: the kept requests' first start
    to their last end, and when each of them ended (epoch seconds)."""
    keep = log["start"] >= log["start"].min() + warmup_s
    ends = log["start"][keep] + log["response_ms"][keep] / 1000
    return float(log["start"][keep].min()), float(ends.max()), ends


def locust_totals(stats_json: Path) -> dict | None:
    """Locust's own counts from its --json-file (written at shutdown, so complete): totals and per variant.

    Its _stats.csv is a snapshot rewritten every second and can miss the last second of a run.
    """
    if not stats_json.is_file():
        return None
    entries = json.loads(stats_json.read_text())
    by_variant: dict[str, int] = {}
    for entry in entries:
        variant = entry["name"].rpartition("[")[2].rstrip("]") if entry["name"].endswith("]") else "?"
        by_variant[variant] = by_variant.get(variant, 0) + entry["num_requests"]
    return {
        "requests": sum(e["num_requests"] for e in entries),
        "failures": sum(e["num_failures"] for e in entries),
        "by_variant": by_variant,
    }


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, None where either is missing or NaN or the denominator is 0."""
    if numerator is None or denominator is None or math.isnan(numerator) or math.isnan(denominator):
        return None
    return numerator / denominator if denominator else None


def ratios(candidate: dict, baseline: dict) -> dict[str, float | None]:
    """candidate / baseline for RPS and every latency figure (below 1 on latency = candidate faster)."""
    return {metric: ratio(candidate.get(metric), baseline.get(metric)) for metric in RATIO_METRICS}


def build_report(
    rows: dict[str, dict],
    settings: dict,
    ceiling: dict | None = None,
    baseline: str = "full",
    candidate: str = "compressed",
    extra: dict | None = None,
) -> dict:
    """The report as a dict (what loadtest-report.json holds).

    Args:
        rows: variant name -> row (see module docstring).
        settings: how the load was generated (mode, users, rate, duration, ...), echoed into the report.
        ceiling: the row of the trivial endpoint under the same load, if measured.
        baseline, candidate: the ratio is candidate / baseline when both are present.
    Example:
        >>> r = build_report({"full": {"rps": 100.0, "p50_ms": 10.0},
        ...                   "compressed": {"rps": 150.0, "p50_ms": 5.0}}, {"mode": "ab"})
        >>> r["ratios"]["compressed/full"]["rps"], r["ratios"]["compressed/full"]["p50_ms"]
        (1.5, 0.5)
    """
    report = {"settings": settings, "variants": rows, "ceiling": ceiling, "ratios": {}, **(extra or {})}
    if baseline in rows and candidate in rows and baseline != candidate:
        report["ratios"][f"{candidate}/{baseline}"] = ratios(rows[candidate], rows[baseline])
    if ceiling is not None:
        for name in dict.fromkeys((candidate, baseline)):
            if name in rows:
                report["ratios"][f"{name}/ceiling"] = {
                    metric: ratio(rows[name].get(metric), ceiling.get(metric))
                    for metric in ("cpu_us_per_request", "rps")
                }
    return report


def fmt(template: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return template.format(value)


def markdown_table(rows: dict[str, dict]) -> list[str]:
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(c[0] in row for row in rows.values())]
    lines = [
        "| variant | " + " | ".join(title for _, title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(t, row.get(key)) for key, _, t in columns) + " |")
    return lines


def render_markdown(report: dict) -> str:
    """loadtest-report.md: what was run, the per-variant table, the ratios."""
    s = report["settings"]
    load = f"at {s['rate']:g} RPS offered" if s.get("rate") else "at saturation (no think time)"
    lines = [f"# Load test: {s.get('mode', '?')}, {s.get('users', '?')} users, {load}", ""]
    facts = [
        ("target", s.get("host")),
        ("duration per phase", s.get("duration")),
        ("warm-up left out", s.get("warmup")),
        ("load generators", s.get("generators")),
        ("request mix", s.get("mix")),
        ("load average (1, 5, 15 min) before / after", s.get("loadavg")),
    ]
    lines += [f"- {name}: {value}" for name, value in facts if value not in (None, "")]
    table = dict(report["variants"])
    if report.get("ceiling"):
        table["ceiling"] = report["ceiling"]
    lines += ["", *markdown_table(table)]
    for pair, values in report["ratios"].items():
        if pair.endswith("/ceiling"):
            continue
        lines += [
            "",
            f"Ratios {pair} (RPS above 1 and latency below 1 favour {pair.split('/')[0]}):",
            "",
            "| " + " | ".join(RATIO_METRICS) + " |",
            "|" + "---:|" * len(RATIO_METRICS),
            "| " + " | ".join(fmt("{:.3f}", values[m]) for m in RATIO_METRICS) + " |",
        ]
    ceiling_pairs = [(pair, v) for pair, v in report["ratios"].items() if pair.endswith("/ceiling")]
    if ceiling_pairs:
        lines += [
            "",
            "Against the trivial endpoint (the ceiling: FastAPI answering ten constant items, same load), "
            "server CPU per request and RPS: "
            + "; ".join(
                f"{pair} CPU/request {fmt('{:.2f}x', v.get('cpu_us_per_request'))}, "
                f"RPS {fmt('{:.3f}', v['rps'])}"
                for pair, v in ceiling_pairs
            ),
        ]
    ab_cpu = (report.get("phases", {}).get("ab") or {}).get("server_cpu")
    if ab_cpu:
        lines += [
            "",
            f"Server CPU over the A/B phase (every variant): {fmt('{:,.0f}', ab_cpu['us_per_request'])} us "
            f"per request, {fmt('{:.2f}', ab_cpu['cores_busy'])} cores busy.",
        ]
    for note in report.get("notes", []):
        lines += ["", f"Note: {note}"]
    return "\n".join(lines) + "\n"


def plot_latency(latencies: dict[str, np.ndarray], path: Path, title: str = "") -> Path:
    """PNG: latency CDF per variant (log x) and its p50/p90/p95/p99 as grouped bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (cdf, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [n for n, v in latencies.items() if len(v)]
    for name in names:
        values = np.sort(latencies[name])
        cdf.plot(values, np.arange(1, values.size + 1) / values.size, label=f"{name} (n={values.size:,})")
    cdf.set_xscale("log")
    cdf.set_xlabel("latency (ms, log)")
    cdf.set_ylabel("fraction of requests")
    cdf.grid(True, which="both", alpha=0.3)
    cdf.legend()
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = np.percentile(latencies[name], PERCENTILES)
        bars.bar(np.arange(len(PERCENTILES)) + i * width, values, width, label=name)
    ticks = np.arange(len(PERCENTILES)) + width * (len(names) - 1) / 2
    bars.set_xticks(ticks, [f"p{p}" for p in PERCENTILES])
    bars.set_ylabel("latency (ms)")
    bars.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def without_nan(value):
    """NaN -> None, recursively (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def write_report(out: Path, report: dict, latencies: dict[str, np.ndarray]) -> dict[str, Path]:
    """loadtest-report.{md,json} and loadtest-latency.png in `out`; returns the paths."""
    paths = {
        "markdown": out / "loadtest-report.md",
        "json": out / "loadtest-report.json",
        "png": out / "loadtest-latency.png",
    }
    paths["json"].write_text(json.dumps(without_nan(report), indent=2, allow_nan=False) + "\n")
    paths["markdown"].write_text(render_markdown(report))
    if not any(len(v) for v in latencies.values()):  # wrk: no per-request latencies to plot
        del paths["png"]
        return paths
    s = report["settings"]
    plot_latency(
        latencies,
        paths["png"],
        f"{s.get('mode')}, {s.get('users')} users, "
        + (f"{s['rate']:g} RPS offered" if s.get("rate") else "saturation"),
    )
    return paths
