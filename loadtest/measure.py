"""Latency of a real `slimrec serve` process over HTTP: p50/p99 per variant, batcher on vs off.

    python -m slimrec.loadtest.measure --variant full=artifacts/teacher \\
        --variant compressed=artifacts/compressed [--requests 1000] [--concurrency 16]

Starts its own server on a free loopback port (one per configuration), sends sequential
keep-alive requests forced to each variant with X-Slimrec-Variant, then a concurrent burst
with the batcher on (max batch 16) and off (batch of 1, thread pool only). Latency is
measured by the client (httpx, so it includes the client's own overhead) and by the server
(the `total` of its Server-Timing header). Not a load test: see loadtest/ for that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
from slimrec.loadtest.launch import local_server


def server_total_ms(header: str) -> float:
    """The `total` entry of a Server-Timing header, in ms."""
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name == "total":
            return float(duration)
    return float("nan")


def summarize(client_ms: list[float], server_ms: list[float], seconds: float) -> dict:
    c, s = np.asarray(client_ms), np.asarray(server_ms)
    return {
        "requests": len(c),
        "rps": len(c) / seconds,
        "client_p50_ms": float(np.percentile(c, 50)),
        "client_p99_ms": float(np.percentile(c, 99)),
        "server_p50_ms": float(np.nanpercentile(s, 50)),
        "server_p99_ms": float(np.nanpercentile(s, 99)),
    }


def measure_sequential(url: str, variant: str, users: list[str], n: int, k: int = 10) -> dict:
    """n sequential POST /v1/recommend on one keep-alive connection, forced to `variant`."""
    import httpx

    client_ms, server_ms = [], []
    with httpx.Client(base_url=url, headers={"X-Slimrec-Variant": variant}, timeout=30) as client:
        for i in range(min(50, n)):  # warm-up: connection, ORT arenas, caches
            client.post("/v1/recommend", json={"user_id": users[i % len(users)], "k": k})
        started = time.perf_counter()
        for i in range(n):
            t0 = time.perf_counter()
            response = client.post("/v1/recommend", json={"user_id": users[i % len(users)], "k": k})
            client_ms.append((time.perf_counter() - t0) * 1000)
            response.raise_for_status()
            server_ms.append(server_total_ms(response.headers.get("server-timing", "")))
        seconds = time.perf_counter() - started
    return summarize(client_ms, server_ms, seconds)


def measure_concurrent(url: str, users: list[str], n: int, concurrency: int, k: int = 10) -> dict:
    """n requests from `concurrency` concurrent keep-alive connections (asyncio httpx)."""
    import httpx

    async def run() -> dict:
        client_ms, server_ms = [], []
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

            async def worker(offset: int, count: int):
                for i in range(count):
                    t0 = time.perf_counter()
                    response = await client.post(
                        "/v1/recommend", json={"user_id": users[(offset + i) % len(users)], "k": k}
                    )
                    client_ms.append((time.perf_counter() - t0) * 1000)
                    response.raise_for_status()
                    server_ms.append(server_total_ms(response.headers.get("server-timing", "")))

            await asyncio.gather(*(worker(w * 97, 20) for w in range(concurrency)))  # warm-up
            client_ms.clear()
            server_ms.clear()
            started = time.perf_counter()
            await asyncio.gather(*(worker(w * 97, n // concurrency) for w in range(concurrency)))
            return summarize(client_ms, server_ms, time.perf_counter() - started)

    return asyncio.run(run())


def batch_sizes(url: str) -> str:
    """Mean batch size per variant from /metrics."""
    import httpx

    sums, counts = {}, {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        for name, store in (("slimrec_batch_size_sum", sums), ("slimrec_batch_size_count", counts)):
            if line.startswith(name + "{"):
                variant = line.split('variant="')[1].split('"')[0]
                store[variant] = float(line.rsplit(" ", 1)[1])
    return ", ".join(f"{v} {sums[v] / counts[v]:.1f}" for v in sorted(counts) if counts[v])


def print_table(rows: list[tuple[str, dict]]) -> None:
    print(
        f"{'configuration':<36} {'n':>6} {'rps':>7} {'client p50':>11} {'client p99':>11} "
        f"{'server p50':>11} {'server p99':>11}"
    )
    for name, r in rows:
        print(
            f"{name:<36} {r['requests']:>6} {r['rps']:>7.0f} {r['client_p50_ms']:>9.2f}ms "
            f"{r['client_p99_ms']:>9.2f}ms {r['server_p50_ms']:>9.2f}ms {r['server_p99_ms']:>9.2f}ms"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append", required=True, metavar="NAME=ARTIFACT_DIR")
    parser.add_argument("--requests", type=int, default=1000, help="sequential requests per variant")
    parser.add_argument("--concurrency", type=int, default=16, help="0 skips the concurrent comparison")
    parser.add_argument("--concurrent-requests", type=int, default=2000)
    args = parser.parse_args(argv)
    variants = dict(v.split("=", 1) for v in args.variant)
    catalogue = json.loads((Path(next(iter(variants.values()))) / "catalogue.json").read_text())
    users = [str(u) for u in catalogue["user_ids"]]
    rows = []
    with local_server(variants) as (url, _):  # default settings: batcher on, max batch 16, 2 ms under load
        for name in variants:
            rows.append((f"sequential {name}", measure_sequential(url, name, users, args.requests)))
    if args.concurrency:
        configurations = (
            ("batcher on (max 16, 0 ms)", ("--batch-max-wait-ms", "0")),
            ("batcher on (max 16, 2 ms under load)", ("--batch-max-size", "16")),
            ("batcher off (thread pool)", ("--batch-max-size", "1")),
        )
        for label, flags in configurations:
            with local_server(variants, *flags) as (url, _):
                result = measure_concurrent(url, users, args.concurrent_requests, args.concurrency)
                rows.append((f"c={args.concurrency} {label}", result))
                print(f"{label}: mean batch size {batch_sizes(url)}", file=sys.stderr)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
