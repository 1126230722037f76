"""Render the compression report as Markdown and as a PNG trade-off plot."""

from __future__ import annotations

import io


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def render_markdown(report: dict) -> str:
    rows = report["rows"]
    lines = [
        f"# Compression report — {report['dataset']}, split {report['split']}",
        "",
        "Sizes are bytes on disk of the served model parts (user tower, ranker with its embedding "
        "tables, item index); *served* adds the user data every variant carries (histories, features) "
        "and the catalogue. Memory is the RSS growth of a fresh process loading the served model. "
        "Latency: one request at a time (batch 1, 1 thread), user tower + top-N retrieval + ranking "
        "+ top-10 (N: the stage's candidate budget), all stages interleaved in one run.",
        "",
        "| stage | model MB | served MB | memory MB | params | index | B/item (index) | recall@200 vs exact "
        "| N | p50 ms | p99 ms | embed / retrieve / rank p50 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        params = (
            sum(v for k, v in r["parameters"].items() if k in ("user_tower", "ranker"))
            if r["parameters"]
            else 0
        )
        depth = f" nprobe={r['index']['nprobe']}" if r["index"]["kind"] != "flat" else ""
        index = r["index"]["kind"] + depth
        lines.append(
            f"| {r['stage']} | {_mb(r['model_bytes'])} | {_mb(r['served_bytes'])} | {_mb(r['memory_bytes'])} "
            f"| {params:,} | {index} | {r['bytes_per_item_index']:.0f} | {r['index_recall@200']:.4f} "
            f"| {r.get('n_candidates', 200)} | {r['total_p50_ms']:.3f} | {r['total_p99_ms']:.3f} "
            f"| {r['embed_p50_ms']:.3f} / {r['retrieve_p50_ms']:.3f} / {r['rank_p50_ms']:.3f} |"
        )
    for fold in ("valid", "test"):
        lines += [
            "",
            f"## Quality ({fold}; PROTOCOL.md metrics)",
            "",
            "| stage | two-stage NDCG@10 | R@10 | R@50 | R@200 | HR@10 | MRR@10 | retrieval NDCG@10 "
            "| retrieval R@200 | ranker AUC | history-only NDCG@10 |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            t, s = r["two_stage"][fold], r["retrieval"][fold]
            auc = r["ranker"].get(fold, {}).get("auc", float("nan"))
            new_users = r.get("history_only", {}).get(fold, {}).get("ndcg@10", float("nan"))
            lines.append(
                f"| {r['stage']} | {t['ndcg@10']:.4f} | {t['recall@10']:.4f} | {t['recall@50']:.4f} "
                f"| {t['recall@200']:.4f} | {t['hr@10']:.4f} | {t['mrr@10']:.4f} "
                f"| {s['ndcg@10']:.4f} | {s['recall@200']:.4f} | {auc:.4f} | {new_users:.4f} |"
            )
    lines += render_candidates(report.get("candidates") or {})
    ratios = report["ratios"]
    gate = report["gate"]
    lines += [
        "",
        "History-only: the same users sent as new users are, by their recent items alone (no id, no "
        "side features); `*_history_only_ndcg@10` below is that over the known-user test NDCG@10.",
        "",
        "## Compressed vs teacher",
        "",
        *(f"- {k}: {v:.4f}" for k, v in ratios.items()),
        "",
        f"## Quality gate (validation, tolerance {gate['tolerance']:g} relative; the compressed "
        f"model's K=10 metrics at its candidate budget, N={gate.get('n_candidates', 200)})",
        "",
        "promotable: **yes**" if gate["promotable"] else "promotable: **no**",
        *(f"- {f}" for f in gate["failures"]),
        "",
    ]
    return "\n".join(lines)


def render_candidates(serving: dict) -> list[str]:
    """The candidate budget section: the figures per budget on validation, the cost on test."""
    record = serving.get("candidate_budget")
    if not record:
        return []
    chosen, reference = serving["n_candidates"], record["reference"]
    lines = [
        "",
        "## Ranker candidate budget (chosen on validation)",
        "",
        f"The ranker ranks the index's top N. N = **{chosen}**: walking down from {reference}, the "
        "smallest budget reached before one whose validation two-stage NDCG@10 (selection models, "
        f"k=10) falls below the {reference}-candidate figure x (1 - {record['tolerance']:g}), for the "
        "users known and sent as new users (history only). "
        "Requests for more than N items rank as many as they ask for, so the deeper metrics "
        "above (R@50, R@200) are unchanged; NDCG@10, R@10, HR@10 and MRR@10 "
        "are those of N.",
        "",
        f"| fold | N | two-stage NDCG@10 | change vs {reference} (paired SE) | R@10 | HR@10 | MRR@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    folds = {"valid": "valid", "valid_history_only": "valid, new users", "test": "test"}
    folds["test_history_only"] = "test, new users"
    for fold, label in folds.items():
        for r in record.get(fold, []):
            mark = " (chosen)" if r["n_candidates"] == chosen else ""
            lines.append(
                f"| {label} | {r['n_candidates']}{mark} | {r['ndcg@10']:.4f} "
                f"| {r['ndcg@10_change']:+.4f} ({r['ndcg@10_change_se']:.4f}) | {r['recall@10']:.4f} "
                f"| {r['hr@10']:.4f} | {r['mrr@10']:.4f} |"
            )
    lines.append(f"\nChosen in {record['seconds']:.1f} s (both folds).")
    return lines


def render_plot(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "model_bytes", "served model size (MB, log)"),
        (axes[1], "total_p50_ms", "per-request latency p50 (ms, log)"),
    ):
        xs = [r[key] / 2**20 if key == "model_bytes" else r[key] for r in rows]
        ys = [r["two_stage"]["test"]["ndcg@10"] for r in rows]
        ax.plot(xs, ys, "o-", color="tab:blue")
        for x, y, r in zip(xs, ys, rows, strict=True):
            ax.annotate(r["stage"], (x, y), textcoords="offset points", xytext=(5, 5), fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("two-stage NDCG@10 (test)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"slimrec compression trade-off — {report['dataset']}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
