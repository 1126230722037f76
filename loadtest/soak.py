"""`slimrec soak`: steady load on every variant of a real server, watching its memory.

    slimrec soak --start full=artifacts/teacher,compressed=artifacts/compressed \\
                 --duration 180s --concurrency 8 [--warmup 20s] [--json soak.json]

Starts `slimrec serve` on a free loopback port, keeps `concurrency` keep-alive connections
busy for `duration` (or `--max-requests`, whichever ends first), round-robins requests over
the variants with X-Slimrec-Variant, and mixes known users, new users with a history,
unknown users (popularity fallback) and genre filters. The server's resident memory (psutil,
its pid) is sampled every second; growth is measured from the end of the warm-up to the end
(medians of 3 samples each). Prints requests, errors (any non-200 or transport error),
p50/p99 client latency after warm-up, RSS start/end/max/growth; exits 1 on any error or
growth above `--max-growth-pct`. The server is stopped with SIGTERM (SIGKILL after 15 s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from slimrec.loadtest.cli import parse_start
from slimrec.loadtest.launch import local_server
from slimrec.loadtest.units import parse_duration

MAX_DURATION_S = 24 * 3600.0
RSS_SAMPLE_S = 1.0


def register(subparsers) -> None:
    """Add `soak` to slimrec's argparse subparsers."""
    soak = subparsers.add_parser(
        "soak", help="steady load on a fresh loopback server; memory growth, errors, p50/p99"
    )
    soak.add_argument(
        "--start",
        required=True,
        metavar="NAME=ARTIFACT_DIR,...",
        help="variants of the server to start (e.g. full=artifacts/teacher,compressed=...)",
    )
    soak.add_argument("--duration", default="180s", help="e.g. 180s, 3m, 1m30s, 10 (seconds); at most 24 h")
    soak.add_argument("--concurrency", type=int, default=8, help="concurrent connections (1-1024)")
    soak.add_argument(
        "--warmup",
        default=None,
        help="excluded from latency and the memory baseline (default: duration/6, 2-30 s)",
    )
    soak.add_argument("--max-requests", type=int, default=5_000_000, help="stop after this many requests")
    soak.add_argument("--max-growth-pct", type=float, default=5.0, help="RSS growth that fails the run")
    soak.add_argument("--k", type=int, default=10)
    soak.add_argument("--seed", type=int, default=0)
    soak.add_argument("--json", type=Path, help="also write the report as JSON")
    soak.set_defaults(run=run_soak, command="soak")


@dataclass
class Tally:
    """What the load loop saw; latencies only after the warm-up."""

    requests: int = 0
    measured: int = 0
    per_variant: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    def error(self, kind: str, example: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_examples) < 5:
            self.error_examples.append(example[:300])


def run_soak(args: argparse.Namespace) -> int:
    variants = parse_start([args.start])
    for name, path in variants.items():
        if not (Path(path) / "catalogue.json").is_file():
            raise ValueError(f"--start: {name}={path} is not an artifact directory (no catalogue.json)")
    if not 1 <= args.concurrency <= 1024 or args.max_requests < 1 or not 1 <= args.k <= 200:
        raise ValueError("--concurrency must be 1-1024, --max-requests >= 1, --k 1-200")
    duration = parse_duration(args.duration)
    if not 0 < duration <= MAX_DURATION_S:
        raise ValueError(f"--duration {args.duration!r}: must be more than 0 and at most 24 h")
    warmup = parse_duration(args.warmup) if args.warmup is not None else min(30.0, max(2.0, duration / 6))
    if warmup >= duration:
        raise ValueError(f"--warmup ({warmup:g} s) must be shorter than --duration ({duration:g} s)")
    report = soak(variants, duration, args.concurrency, warmup, args.max_requests, args.k, args.seed)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    failed = (
        report["errors"] > 0
        or report["rss_growth_pct"] > args.max_growth_pct
        or report["server_exit_code"] != 0
    )
    return 1 if failed else 0


def soak(
    variants: dict[str, str],
    duration_s: float,
    concurrency: int,
    warmup_s: float,
    max_requests: int,
    k: int = 10,
    seed: int = 0,
) -> dict:
    """Start a server with `variants`, load it, stop it; the report as a dict (see `print_report`).

    Example:
        >>> soak({"full": "artifacts/teacher"}, 10, 4, 2, 100_000)["errors"]
        0
    """
    catalogue = json.loads((Path(next(iter(variants.values()))) / "catalogue.json").read_text())
    with local_server(variants) as (url, process):
        tally = asyncio.run(
            _load(
                url,
                process.pid,
                list(variants),
                catalogue,
                duration_s,
                concurrency,
                warmup_s,
                max_requests,
                k,
                seed,
            )
        )
    return summarize(tally, variants, duration_s, concurrency, warmup_s, process)


def request_mix(rng: random.Random, catalogue: dict, k: int) -> dict:
    """One request body: 70% known users, 10% new users with a history, 10% unknown users, 10% genres."""
    users, items = catalogue["user_ids"], catalogue["item_ids"]
    roll = rng.random()
    if roll < 0.7:
        return {"user_id": str(rng.choice(users)), "k": k}
    if roll < 0.8:
        history = [str(rng.choice(items)) for _ in range(rng.randint(1, 30))]
        return {"user_id": f"soak-new-{rng.randrange(10**9)}", "k": k, "history": history}
    if roll < 0.9:
        return {"user_id": f"soak-unknown-{rng.randrange(10**9)}", "k": k}
    return {
        "user_id": str(rng.choice(users)),
        "k": k,
        "include_genres": ["Drama"],
        "exclude_genres": ["Horror"],
    }


async def _load(
    url: str,
    pid: int,
    names: list[str],
    catalogue: dict,
    duration_s: float,
    concurrency: int,
    warmup_s: float,
    max_requests: int,
    k: int,
    seed: int,
) -> Tally:
    import httpx
    import psutil

    tally = Tally(per_variant={name: 0 for name in names})
    server = psutil.Process(pid)
    started = time.perf_counter()
    end = started + duration_s
    measure_from = started + warmup_s

    async def sample_rss():
        while time.perf_counter() < end:
            with contextlib.suppress(psutil.Error):
                tally.rss.append((time.perf_counter() - started, server.memory_info().rss))
            await asyncio.sleep(RSS_SAMPLE_S)

    async def worker(index: int, client: httpx.AsyncClient):
        rng = random.Random(seed * 1_000_003 + index)
        while time.perf_counter() < end and tally.requests < max_requests:
            name = names[tally.requests % len(names)]
            tally.requests += 1
            body = request_mix(rng, catalogue, k)
            t0 = time.perf_counter()
            try:
                response = await client.post("/v1/recommend", json=body, headers={"X-Slimrec-Variant": name})
            except httpx.HTTPError as exc:
                tally.error(type(exc).__name__, f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0.05)  # a dead server must not turn this into a busy loop
                continue
            t1 = time.perf_counter()
            if response.status_code != 200:
                tally.error(str(response.status_code), f"{response.status_code} {response.text}")
                continue
            tally.per_variant[name] += 1
            if t0 >= measure_from:
                tally.measured += 1
                tally.latencies_ms.append((t1 - t0) * 1000)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        await asyncio.gather(sample_rss(), *(worker(i, client) for i in range(concurrency)))
    return tally


def summarize(
    tally: Tally,
    variants: dict[str, str],
    duration_s: float,
    concurrency: int,
    warmup_s: float,
    process: subprocess.Popen,
) -> dict:
    import numpy as np

    latencies = np.asarray(tally.latencies_ms) if tally.latencies_ms else np.full(1, np.nan)
    after = [rss for t, rss in tally.rss if t >= warmup_s] or [rss for _, rss in tally.rss] or [0]
    start_rss, end_rss = float(np.median(after[:3])), float(np.median(after[-3:]))
    measured_s = max(duration_s - warmup_s, 1e-9)
    return {
        "variants": variants,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "concurrency": concurrency,
        "requests": tally.requests,
        "requests_measured": tally.measured,
        "rps_measured": tally.measured / measured_s,
        "ok_per_variant": tally.per_variant,
        "errors": sum(tally.errors.values()),
        "errors_by_kind": tally.errors,
        "error_examples": tally.error_examples,
        "p50_ms": float(np.percentile(latencies, 50)),
        "p99_ms": float(np.percentile(latencies, 99)),
        "max_ms": float(np.max(latencies)),
        "rss_start_mib": start_rss / 2**20,
        "rss_end_mib": end_rss / 2**20,
        "rss_max_mib": max(after) / 2**20,
        "rss_samples": len(tally.rss),
        "rss_growth_pct": (end_rss - start_rss) / start_rss * 100 if start_rss else float("nan"),
        "server_pid": process.pid,
        "server_exit_code": process.returncode,
    }


def print_report(r: dict) -> None:
    per_variant = "  ".join(f"{name} {count}" for name, count in r["ok_per_variant"].items())
    print(
        f"soak: {r['duration_s']:g} s at concurrency {r['concurrency']} on {', '.join(r['variants'])} "
        f"(server pid {r['server_pid']}, 127.0.0.1)"
    )
    print(
        f"requests  {r['requests']} ({per_variant}); after the {r['warmup_s']:g} s warm-up "
        f"{r['requests_measured']}, {r['rps_measured']:.0f} rps"
    )
    first = f" {r['errors_by_kind']}: {r['error_examples'][0]}" if r["errors"] else ""
    print(f"errors    {r['errors']}{first}")
    print(f"latency   p50 {r['p50_ms']:.2f} ms  p99 {r['p99_ms']:.2f} ms  max {r['max_ms']:.1f} ms")
    print(
        f"RSS       start {r['rss_start_mib']:.1f} MiB (after warm-up)  end {r['rss_end_mib']:.1f} MiB  "
        f"max {r['rss_max_mib']:.1f} MiB  growth {r['rss_growth_pct']:+.2f}%  ({r['rss_samples']} samples)"
    )
    print(f"server    exit code {r['server_exit_code']} after SIGTERM")
