"""`slimrec experiment logging-cost`: what exposure and event logging costs a server, per request.

The same artifact is served with logging on and off, alternately, `rounds` times each; each
round drives the same traffic (known users: a recommendation, then the event that followed it,
as in a replay) and reads the server's CPU time (process and children, /proc) before and after.
CPU per request does not depend on who else uses the cores; the ratio of the medians is the
figure. A benchmark, not a test: it prints figures.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path

import httpx
from slimrec.artifact import load_artifact
from slimrec.loadtest.launch import local_server
from slimrec.serving.variants import CATALOGUE


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and its waited-for children (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, users: list[str], items: list[str], requests: int, concurrency: int) -> int:
    """`requests` recommendation + event pairs from `concurrency` clients; returns the failures."""
    failures = 0
    counter = iter(range(requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal failures
        for n in counter:
            user = users[n % len(users)]
            answer = await client.post(f"{url}/v1/recommend", json={"user_id": user, "k": 10})
            event = {
                "event_id": f"cost-{n}",
                "user_id": user,
                "item_id": items[n % len(items)],
                "timestamp": 1e9 + n,
                "type": "watch",
            }
            posted = await client.post(f"{url}/v1/events", json={"events": [event]})
            failures += (answer.status_code != 200) + (posted.status_code != 200)

    async with httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
    return failures


def measure(artifact: Path, logging: bool, requests: int, concurrency: int, users, items) -> dict:
    """One round: a fresh server, warmed up, then `requests` pairs; its CPU per pair."""
    flag = "--event-log" if logging else "--no-event-log"
    with local_server({"served": str(artifact)}, flag) as (url, process):  # a state directory of its own
        asyncio.run(drive(url, users, items, min(500, requests), concurrency))  # warm-up
        before, started = cpu_seconds(process.pid), time.perf_counter()
        failures = asyncio.run(drive(url, users, items, requests, concurrency))
        cpu, wall = cpu_seconds(process.pid) - before, time.perf_counter() - started
    return {"cpu_us_per_request": cpu / requests * 1e6, "rps": requests / wall, "failures": failures}


def logging_cost(artifact: Path, requests: int = 5000, rounds: int = 3, concurrency: int = 8) -> dict:
    """Median CPU per request with logging on and off, alternating rounds; prints each round."""
    catalogue = load_artifact(artifact).read_json(CATALOGUE)
    users = [str(u) for u in catalogue["user_ids"][:500]]
    items = [str(i) for i in catalogue["item_ids"][:500]]
    rows: dict[bool, list[dict]] = {True: [], False: []}
    for round_ in range(rounds):
        for logging in (False, True):
            row = measure(artifact, logging, requests, concurrency, users, items)
            rows[logging].append(row)
            print(
                f"  round {round_ + 1} logging {'on ' if logging else 'off'}: "
                f"{row['cpu_us_per_request']:.0f} us CPU per request, {row['rps']:.0f} pairs/s, "
                f"{row['failures']} failed",
                flush=True,
            )
    on = statistics.median(r["cpu_us_per_request"] for r in rows[True])
    off = statistics.median(r["cpu_us_per_request"] for r in rows[False])
    return {
        "artifact": str(artifact),
        "requests_per_round": requests,
        "rounds": rounds,
        "concurrency": concurrency,
        "cpu_us_per_request": {"on": on, "off": off},
        "ratio_on_off": on / off,
        "failures": sum(r["failures"] for r in rows[True] + rows[False]),
    }
