"""The A/B report written out: Markdown, JSON and a PNG (experiment/report.py computes it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import orjson
from slimrec.experiment.report import METRICS


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
