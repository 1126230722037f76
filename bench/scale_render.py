"""Tables and the plot of `slimrec bench --catalogue` (scale.md, scale.png)."""

from __future__ import annotations

from slimrec.bench.figures import STAGE_NAMES, median_p99, mib
from slimrec.bench.timing import STAGES

VARIANT_NAMES = ("full", "compressed")


def _b1(bench: dict, variant: str) -> dict:
    """The batch-1, 1-thread latency row of a variant."""
    return next(
        r for r in bench["latency"] if r["variant"] == variant and r["batch"] == 1 and r["threads"] == 1
    )


def _b1_ratio(bench: dict) -> dict:
    return next(r for r in bench["ratios"] if r["batch"] == 1 and r["threads"] == 1)["stages"]


def render_scale(report: dict) -> str:
    runs = report["sizes"]
    machine = runs[-1]["bench"]["machine"]
    lines = [
        "# slimrec bench --catalogue: full vs compressed as the catalogue grows",
        "",
        f"{machine['cpu'] or 'CPU'}, {machine['cpus']} CPUs, shared with other jobs (load average per "
        "size below). Synthetic data (models/synth.py), models trained briefly (bench/scale.py).",
        "",
        *latency_rows(runs),
        "",
        *index_rows(runs),
        "",
        *build_rows(runs),
        "",
        *sanity_rows(runs),
    ]
    return "\n".join(lines)


def latency_rows(runs: list[dict]) -> list[str]:
    lines = [
        "## Per request, batch 1, 1 thread (ms, median / p99)",
        "",
        "| catalogue | variant | " + " | ".join(STAGE_NAMES[s] for s in STAGES) + " | load avg (1 min) |",
        "|---|---|" + "---:|" * len(STAGES) + "---:|",
    ]
    for run in runs:
        label, bench = run["size"]["label"], run["bench"]
        load = f"{bench['machine']['loadavg_before'][0]:.1f} → {bench['machine']['loadavg_after'][0]:.1f}"
        for variant in VARIANT_NAMES:
            row = _b1(bench, variant)["stages"]
            lines.append(
                f"| {label} | {variant} | " + " | ".join(median_p99(row[s]) for s in STAGES) + f" | {load} |"
            )
        ratio = _b1_ratio(bench)
        lines.append(
            f"| {label} | *compressed / full* | "
            + " | ".join(f"{ratio[s]['median']:.2f}x / {ratio[s]['p99']:.2f}x" for s in STAGES)
            + " | |"
        )
    return lines


def index_rows(runs: list[dict]) -> list[str]:
    lines = [
        "## Index and memory",
        "",
        "| catalogue | variant | d | index | build | index file "
        "| recall@200 vs exact (ties / strict) | resident "
        "| served files |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        label, variants = run["size"]["label"], run["bench"]["variants"]
        for variant in VARIANT_NAMES:
            v, idx = variants[variant], run["build"]["index"][variant]
            code = idx["kind"].removeprefix("ivf_").upper()
            kind = (
                "Flat (exact)"
                if idx["kind"] == "flat"
                else f"IVF{idx['nlist']},{code} nprobe {idx['nprobe']}"
            )
            build = run["build"]
            recall = (
                "1 (exact)"
                if variant == "full"
                else (f"{build['index_recall@200']:.4f} / {build['index_recall@200_strict']:.4f}")
            )
            lines.append(
                f"| {label} | {variant} | {v['embedding_dim']} | {kind} | "
                f"{idx['build_seconds']:.2f} s | {mib(v['index_bytes'])} | {recall} | "
                f"{mib(v['memory']['resident_bytes'])} | {mib(v['served_bytes'])} |"
            )
        index_ratio = variants["compressed"]["index_bytes"] / variants["full"]["index_bytes"]
        served_ratio = variants["compressed"]["served_bytes"] / variants["full"]["served_bytes"]
        lines.append(
            f"| {label} | *compressed / full* | | | | {index_ratio:.3f}x | "
            f"| {run['bench']['memory_ratio']:.2f}x | {served_ratio:.2f}x |"
        )
    return lines


BUILD_STEPS = (
    ("synth", "synth"),
    ("load_split", "load + split"),
    ("teacher_retrieval", "teacher retrieval"),
    ("teacher_ranker", "teacher ranker"),
    ("student_retrieval", "student retrieval"),
    ("student_ranker", "student ranker"),
    ("index_full", "full index"),
    ("index_compressed_tune", "IVF build + tuning"),
    ("write_full", "write full"),
    ("write_compressed", "write compressed"),
    ("recall_sanity", "recall + sanity"),
)


def build_rows(runs: list[dict]) -> list[str]:
    lines = [
        "## Data, training and build (wall seconds on the shared machine; 0 s synth = data reused)",
        "",
        "| catalogue | items / users / interactions | retrieval epoch | "
        + " | ".join(name for _, name in BUILD_STEPS)
        + " | bench | total | peak RSS |",
        "|---|---|---:|" + "---:|" * (len(BUILD_STEPS) + 3),
    ]
    for run in runs:
        build, shape = run["build"], run["build"]["shape"]
        steps = " | ".join(f"{build['seconds'][key]:.0f}" for key, _ in BUILD_STEPS)
        total = sum(build["seconds"].values()) + run["bench"]["seconds"]  # also when the build was reused
        lines.append(
            f"| {run['size']['label']} | {shape['n_items']:,} / {shape['n_users']:,} / "
            f"{shape['interactions']:,} | {shape['retrieval_epoch_interactions']:,} | {steps} | "
            f"{run['bench']['seconds']:.0f} | {total:.0f} | "
            f"{build['peak_rss_bytes'] / 2**30:.1f} GiB |"
        )
    return lines


def sanity_rows(runs: list[dict]) -> list[str]:
    lines = [
        "Sanity, not PROTOCOL: two-stage recall@10 of the served path on "
        f"{runs[-1]['build']['sanity_users']} sampled test users, next to popularity; the IVF "
        "tuning curve (recall@200 vs exact with ties within the tolerance counted, tuning users); "
        "each variant's blend weight of the retrieval score and the compressed variant's ranker "
        "candidate budget (full: 200), chosen on the tuning users.",
        "",
        "| catalogue | full | compressed | popularity | blend weight full / compressed "
        "| candidate budget | items fitted / in the retrieval epoch | nprobe: recall |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for run in runs:
        build = run["build"]
        sanity, shape = build["sanity_recall@10"], build["shape"]
        curve = ", ".join(f"{c['nprobe']}: {c['recall']:.3f}" for c in build["index"]["compressed"]["tuning"])
        lines.append(
            f"| {run['size']['label']} | {sanity['full']:.4f} | {sanity['compressed']:.4f} | "
            f"{sanity['popularity']:.4f} | {blend_weights(build)} | "
            f"{build.get('candidate_budget', {}).get('chosen', 200)} | "
            f"{shape['items_with_fitted_interactions']:,} / "
            f"{shape['items_in_retrieval_epoch']:,} | {curve} |"
        )
    return lines


def blend_weights(build: dict) -> str:
    chosen = build.get("blend_weight")  # builds before it was chosen used 0.4 for both
    return " / ".join(f"{chosen[v]['chosen']:g}" for v in ("full", "compressed")) if chosen else "0.4 / 0.4"


def plot_scale(report: dict) -> bytes:
    """PNG: per-request latency (batch 1, 1 thread) and resident memory vs catalogue size, log-log."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["sizes"]
    items = [r["build"]["shape"]["n_items"] for r in runs]
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant, colour in zip(VARIANT_NAMES, ("tab:blue", "tab:orange"), strict=True):
        rows = [_b1(r["bench"], variant)["stages"] for r in runs]
        variants = [r["bench"]["variants"][variant] for r in runs]
        lat.plot(
            items,
            [x["total"]["median_ms"] for x in rows],
            "o-",
            color=colour,
            label=f"{variant}: total, median",
        )
        lat.plot(
            items,
            [x["total"]["p99_ms"] for x in rows],
            "o--",
            color=colour,
            alpha=0.6,
            label=f"{variant}: total, p99",
        )
        lat.plot(
            items,
            [x["retrieve"]["median_ms"] for x in rows],
            "s:",
            color=colour,
            alpha=0.8,
            label=f"{variant}: retrieval, median",
        )
        mem.plot(
            items,
            [v["memory"]["resident_bytes"] / 2**20 for v in variants],
            "o-",
            color=colour,
            label=f"{variant}: resident (RSS growth)",
        )
        mem.plot(
            items,
            [v["index_bytes"] / 2**20 for v in variants],
            "s:",
            color=colour,
            alpha=0.8,
            label=f"{variant}: index file",
        )
    for ax, title, unit in (
        (lat, "Latency per request (batch 1, 1 thread)", "ms"),
        (mem, "Memory of the loaded model", "MiB"),
    ):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalogue size (items)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
