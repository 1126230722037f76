"""`slimrec replay`: the held-out test fold played as live traffic through real servers.

Before each held-out interaction the replay asks for that user's recommendations (k=10), then
posts the interaction as an event, so the servers log exposures and the events that followed
them exactly as in production; `slimrec experiment report` judges the arms from those logs.
Requests carry the interaction's own time (`timestamp`), so exposures and events share the
events' clock.

Each user's interactions are played in order (time, then item id: PROTOCOL.md's order);
users are played side by side by `concurrency` clients, in order of their first test
interaction. A user's state (live history) is theirs alone, so interleaving users does not
change any answer.

Arms:
  - A/B (default): one server holding every variant, users routed by the split.
  - Paired (`--paired`): one server per variant, each with its own state, and every user
    played through each of them, so arms are compared user by user.
  - `--live-history both`: every arm twice, as `NAME` (events enter live histories) and
    `NAME-frozen` (events logged only), to measure what reacting to the latest events gains.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from slimrec.experiment.report import FROZEN_SUFFIX
from slimrec.loadtest.launch import free_port, serve_command
from slimrec.loadtest.processes import running
from slimrec.models.data import Dataset
from slimrec.models.split import TEST, protocol_split


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    timestamp: float


@dataclass
class ServerSpec:
    """One server of the replay: its variants, split, live-history switch and state directory."""

    name: str
    variants: dict[str, str]
    split: dict[str, float]
    live_history: bool
    state_dir: Path


@dataclass
class Outcome:
    sessions: int = 0  # (user, server) sessions played
    requests: int = 0
    events: int = 0
    failures: list[str] = field(default_factory=list)  # the first few, for the message
    failed: int = 0

    def fail(self, what: str) -> None:
        self.failed += 1
        if len(self.failures) < 5:
            self.failures.append(what)


def held_out_sessions(dataset: Dataset, limit_users: int | None = None) -> list[list[Interaction]]:
    """Each user's test interactions in protocol order, users by their first test interaction."""
    split = protocol_split(dataset)
    rows = split.rows(TEST)  # protocol order: user, then (timestamp, item id)
    users, items = dataset.users.raw_ids, dataset.items.raw_ids
    sessions: dict[int, list[Interaction]] = {}
    for user, item, ts in zip(split.user[rows], split.item[rows], split.timestamp[rows], strict=True):
        sessions.setdefault(int(user), []).append(Interaction(str(users[user]), str(items[item]), float(ts)))
    ordered = sorted(sessions.values(), key=lambda s: (s[0].timestamp, s[0].user_id))
    return ordered[:limit_users] if limit_users else ordered


def server_specs(
    variants: dict[str, str], split: dict[str, float] | None, paired: bool, live: str, out: Path
) -> list[ServerSpec]:
    """The servers to start: one A/B server, or one per arm when paired; doubled for live=both."""
    modes = {"on": [True], "off": [False], "both": [True, False]}[live]
    specs = []
    for live_history in modes:
        suffix = "" if live_history or live != "both" else FROZEN_SUFFIX
        named = {f"{name}{suffix}": path for name, path in variants.items()}
        if paired:
            for name, path in named.items():
                specs.append(
                    ServerSpec(name, {name: path}, {name: 100.0}, live_history, out / "state" / name)
                )
        else:
            weights = {f"{n}{suffix}": w for n, w in (split or {n: 1.0 for n in variants}).items()}
            tag = "ab" + suffix
            specs.append(ServerSpec(tag, named, weights, live_history, out / "state" / tag))
    return specs


def start_command(spec: ServerSpec, port: int, log_dir: Path) -> list[str]:
    split = ",".join(f"{n}={w:g}" for n, w in spec.split.items())
    live = "--live-history" if spec.live_history else "--no-live-history"
    return serve_command(
        spec.variants,
        port,
        "--split",
        split,
        live,
        "--state-dir",
        str(spec.state_dir),
        "--log-dir",
        str(log_dir),
    )


def event_id(step: Interaction, n: int) -> str:
    """A stable id per held-out interaction (ids can be long titles: hashed to 32 hex digits)."""
    key = "\x1f".join((step.user_id, step.item_id, f"{step.timestamp:.0f}", str(n)))
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


async def play_user(
    client: httpx.AsyncClient, url: str, session: list[Interaction], k: int, outcome: Outcome
):
    for n, step in enumerate(session):
        body = {"user_id": step.user_id, "k": k, "timestamp": step.timestamp}
        response = await client.post(f"{url}/v1/recommend", json=body)
        outcome.requests += 1
        request_id = None
        if response.status_code == 200:
            request_id = response.json()["request_id"]
        else:
            outcome.fail(f"recommend {step.user_id!r}: {response.status_code} {response.text[:200]}")
        event = {
            "event_id": event_id(step, n),
            "user_id": step.user_id,
            "item_id": step.item_id,
            "timestamp": step.timestamp,
            "type": "rating",
            "request_id": request_id,
        }
        response = await client.post(f"{url}/v1/events", json={"events": [event]})
        outcome.events += 1
        if response.status_code != 200:
            outcome.fail(f"event {step.user_id!r}: {response.status_code} {response.text[:200]}")


async def play(
    urls: list[str], sessions: list[list[Interaction]], k: int, concurrency: int, deadline: float
) -> Outcome:
    """Every session through every server URL, `concurrency` users at a time per server."""
    outcome = Outcome()
    work: asyncio.Queue = asyncio.Queue()
    for session in sessions:
        for url in urls:
            work.put_nowait((url, session))
    total, started = work.qsize(), time.monotonic()

    async def worker(client: httpx.AsyncClient) -> None:
        while not work.empty() and time.monotonic() < deadline:
            url, session = work.get_nowait()
            await play_user(client, url, session, k, outcome)
            outcome.sessions += 1
            if outcome.sessions % max(1, total // 20) == 0:
                rate = outcome.requests / max(time.monotonic() - started, 1e-9)
                done = f"{outcome.sessions}/{total} user sessions"
                print(f"  replay: {done}, {outcome.requests} requests ({rate:.0f}/s)")

    limits = httpx.Limits(max_connections=concurrency * len(urls))
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency * len(urls))))
    if not work.empty():
        outcome.fail(f"time limit reached with {work.qsize()} user sessions not played")
    return outcome


def replay(
    dataset: Dataset,
    variants: dict[str, str],
    out: Path,
    *,
    split: dict[str, float] | None = None,
    paired: bool = False,
    live: str = "on",
    k: int = 10,
    concurrency: int = 4,
    limit_users: int | None = None,
    max_seconds: float = 3600.0,
) -> tuple[Outcome, Path]:
    """Start the servers, play the test fold through them, stop them; (outcome, log directory)."""
    sessions = held_out_sessions(dataset, limit_users)
    n = sum(map(len, sessions))
    specs = server_specs(variants, split, paired, live, out)
    log_dir = out / "logs"
    for path in (log_dir, out / "state"):
        shutil.rmtree(path, ignore_errors=True)  # the replay owns these: a fresh experiment each run
    log_dir.mkdir(parents=True)
    print(
        f"replay: {len(sessions)} users, {n} held-out interactions, {len(specs)} server(s): "
        + ", ".join(f"{s.name} ({', '.join(s.variants)})" for s in specs)
    )
    with contextlib.ExitStack() as stack:
        urls = []
        for spec in specs:
            spec.state_dir.mkdir(parents=True, exist_ok=True)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(
                running(start_command(spec, port, log_dir), url, out / f"server-{spec.name}.log")
            )
            urls.append(url)
        started = time.monotonic()
        outcome = asyncio.run(play(urls, sessions, k, concurrency, started + max_seconds))
        seconds = time.monotonic() - started
    # the servers have stopped (SIGTERM): their log writers drained and closed
    print(
        f"replay: {outcome.requests} recommendations and {outcome.events} events in {seconds:.0f} s, "
        f"{outcome.failed} failed" + "".join(f"\n  {f}" for f in outcome.failures),
        file=sys.stderr if outcome.failed else sys.stdout,
    )
    return outcome, log_dir


def run_replay(args) -> int:
    from slimrec.experiment.report import build_report
    from slimrec.experiment.report_render import render_markdown, write_report
    from slimrec.loadtest.cli import parse_start
    from slimrec.models.movielens import load_dataset
    from slimrec.serving.eventlog import read_log
    from slimrec.serving.settings import parse_pairs

    variants = parse_start(args.start)
    if args.paired and args.split:
        raise ValueError("--split with --paired: a paired replay plays every user through every arm")
    split = {n: float(w) for n, w in parse_pairs(args.split, "--split").items()} if args.split else None
    if args.k < 1 or args.concurrency < 1:
        raise ValueError(f"--k and --concurrency must be >= 1, got {args.k} and {args.concurrency}")
    dataset = load_dataset(args.data)
    outcome, log_dir = replay(
        dataset,
        variants,
        args.out,
        split=split,
        paired=args.paired,
        live=args.live_history,
        k=args.k,
        concurrency=args.concurrency,
        limit_users=args.limit_users,
        max_seconds=args.max_seconds,
    )
    log = read_log(log_dir)
    report = build_report(log.records, window=args.window, k=args.k, read_stats=log.stats)
    report["replay"] = {"requests": outcome.requests, "events": outcome.events, "failed": outcome.failed}
    write_report(report, args.out / "report")
    print(render_markdown(report))
    return 1 if outcome.failed else 0
