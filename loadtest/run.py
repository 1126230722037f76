"""`slimrec loadtest`'s work: start what is needed, run locust headless per phase, write the report.

Every process started here (a `slimrec serve`, the ceiling app, locust, its master and workers)
listens on 127.0.0.1 only, runs under a deadline, and is stopped by its own pid, also when
something fails (loadtest.processes). The load generator is told when to stop twice: locust's
--run-time and a request cap (--max-requests in the locustfile).

Speaks HTTP to the server; imports nothing of it (nor locust: gevent's monkey-patching would
change this process's threads and subprocesses).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimrec.loadtest.processes import Process, ceiling_server, free_port, slimrec_server, wait_ready
from slimrec.loadtest.workload import RequestMix, Workload, get_json, workload_from_server

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUST_START_S = 60.0  # import, workers connecting (--expect-workers-max-wait), first spawn, on a busy box
LOCUST_STOP_S = 30.0
MAX_RPS_PER_GENERATOR = 20_000  # above one locust process's ~13-14k/s: the default cap never binds early


@dataclass
class LoadConfig:
    """How much load, of which shape, for how long; one config drives every phase of a run."""

    users: int = 16
    spawn_rate: float = 16.0
    duration_s: float = 60.0
    mode: str = "per-variant"
    rate: float | None = None
    workers: int = 0
    warmup_s: float | None = None
    max_requests: int | None = None
    ceiling: bool = False
    mix: RequestMix = field(default_factory=RequestMix)
    zipf: float = 1.0

    def __post_init__(self):
        if self.mode not in ("per-variant", "ab"):
            raise ValueError(f"--mode must be per-variant or ab, got {self.mode!r}")
        if self.users < 1 or self.spawn_rate <= 0 or self.duration_s < 1:
            raise ValueError("--users must be >= 1, --spawn-rate > 0 and --duration >= 1s")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"--rate must be > 0 RPS, got {self.rate}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if self.warmup_s is None:  # leave the ramp out: figures describe the full user count
            self.warmup_s = min(self.users / self.spawn_rate, self.duration_s / 3)
        if not 0 <= self.warmup_s < self.duration_s:
            raise ValueError(
                f"--warmup ({self.warmup_s:g} s) must be shorter than --duration ({self.duration_s:g} s)"
            )
        if self.max_requests is None:
            per_second = self.rate * 1.5 if self.rate else MAX_RPS_PER_GENERATOR * max(1, self.workers)
            self.max_requests = int(math.ceil(per_second * self.duration_s)) + 100

    def describe(self) -> dict:
        settings = asdict(self)
        settings["mix"] = (
            f"{self.mix.new_user_share:.0%} new users with a history, "
            f"{self.mix.genre_share:.0%} of known-user requests genre-filtered, "
            f"k {self.mix.k_mix}, Zipf {self.zipf:g}; "
            "90% POST /v1/recommend, 10% GET /v1/users/{id}/recommendations"
        )
        settings["duration"] = f"{self.duration_s:g} s"
        settings["warmup"] = f"first {self.warmup_s:.1f} s of each phase"
        settings["generators"] = (
            f"1 locust master + {self.workers} worker{'s' if self.workers > 1 else ''}"
            if self.workers
            else "1 locust process"
        )
        return settings

    def locustfile_flags(self, workload: Path, forced: str | None, request_log_dir: Path) -> list[str]:
        flags = [
            "--workload",
            str(workload),
            "--max-requests",
            str(self.max_requests),
            "--request-log-dir",
            str(request_log_dir),
            "--new-user-share",
            str(self.mix.new_user_share),
            "--genre-share",
            str(self.mix.genre_share),
            "--k-mix",
            self.mix.k_mix,
            "--zipf",
            str(self.zipf),
        ]
        if self.rate:
            flags += ["--target-rps", str(self.rate)]
        if forced:
            flags += ["--force-variant", forced]
        return flags


def run_phase(
    phase: str, url: str, config: LoadConfig, out: Path, workload: Path, forced: str | None
) -> dict:
    """One headless locust run (single process, or 1 master + N workers); returns what happened."""
    request_logs = out / "requests" / phase
    if request_logs.exists():
        shutil.rmtree(request_logs)
    base = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE)]
    custom = config.locustfile_flags(workload, forced, request_logs)
    main = [
        *base,
        "--headless",
        "--host",
        url,
        "-u",
        str(config.users),
        "-r",
        str(config.spawn_rate),
        "--run-time",
        f"{math.ceil(config.duration_s)}s",
        "--csv",
        str(out / phase),
        "--json-file",
        str(out / f"{phase}_locust"),
        "--exit-code-on-error",
        "0",
        *custom,
    ]
    workers_cmd = []
    if config.workers:
        port = free_port()
        main += [
            "--master",
            "--master-bind-host",
            "127.0.0.1",
            "--master-bind-port",
            str(port),
            "--expect-workers",
            str(config.workers),
            "--expect-workers-max-wait",
            str(int(LOCUST_START_S)),
        ]
        # -u on a worker spawns nothing (the master decides) but sets num_users, which --target-rps uses.
        workers_cmd = [
            [
                *base,
                "--worker",
                "--master-host",
                "127.0.0.1",
                "--master-port",
                str(port),
                "-u",
                str(config.users),
                *custom,
            ]
        ] * config.workers
    logs = out / "logs"
    loadavg_before = os.getloadavg()
    started = time.monotonic()
    processes: list[Process] = []
    try:
        master = Process(main, logs / f"locust-{phase}.log", echo=phase)
        processes.append(master)
        for i, command in enumerate(workers_cmd):
            processes.append(Process(command, logs / f"locust-{phase}-worker{i}.log"))
        rc = master.wait(config.duration_s + LOCUST_START_S + LOCUST_STOP_S)
        for worker in processes[1:]:  # workers leave when the master quits; bounded all the same
            worker.wait(LOCUST_STOP_S)
    finally:
        for process in reversed(processes):
            process.stop()
    if rc != 0:
        raise RuntimeError(f"locust ({phase}) exited with {rc}:\n{master.tail()}")
    return {
        "seconds": time.monotonic() - started,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "generator_cpu_warning": any(p.seen_cpu_warning for p in processes),
        "request_logs": sorted(str(p) for p in request_logs.glob("*.csv")),
    }


def write_workload(
    out: Path, url: str, variants: list[dict], catalogue: Path | None, start: dict[str, str] | None
) -> Path:
    """workload.json from --catalogue, else the first --start artifact, else the server's own listing."""
    genre_sets = [set(v.get("genres", [])) for v in variants]
    genres = sorted(set.intersection(*genre_sets)) if genre_sets else None
    if catalogue is not None:
        workload = Workload.from_catalogue(catalogue, genres)
    elif start:
        workload = Workload.from_catalogue(next(iter(start.values())), genres)
    else:
        workload = workload_from_server(url)
    return workload.save(out / "workload.json")


def run_loadtest(
    config: LoadConfig,
    out: Path,
    host: str | None = None,
    start: dict[str, str] | None = None,
    split: str | None = None,
    catalogue: Path | None = None,
    serve_args: tuple[str, ...] = (),
) -> tuple[dict, dict[str, Path]]:
    """Drive the variants (each in turn, or the configured A/B split), then the ceiling; write the report.

    Exactly one of `host` (a running server) and `start` (variant name -> artifact dir, served here
    for the run, with `serve_args` added to its command line) is given. Returns (report, paths of
    the files written).
    """
    if (host is None) == (start is None):
        raise ValueError("give either --host URL or --start NAME=ARTIFACT,...")
    out = out.resolve()  # the processes run in the repository root, not necessarily the caller's cwd
    start = {name: str(Path(path).resolve()) for name, path in start.items()} if start else None
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    servers = {}
    with contextlib.ExitStack() as stack:
        if start:
            server = stack.enter_context(slimrec_server(start, split, out / "logs", serve_args))
            url, servers["slimrec"] = server.url, {"url": server.url, "pid": server.pid}
        else:
            url = host.rstrip("/")
            wait_ready(url, None, timeout_s=10.0)
        listing = get_json(f"{url}/v1/variants")
        names = [v["name"] for v in listing["variants"]]
        if config.mode == "per-variant" and not listing.get("overrides_allowed"):
            raise ValueError(
                f"{url} refuses X-Slimrec-Variant (overrides_allowed is false), which "
                "per-variant mode needs: serve on loopback or with --allow-variant-override, "
                "or use --mode ab"
            )
        workload = write_workload(out, url, listing["variants"], catalogue, start)
        phases = {name: name for name in names} if config.mode == "per-variant" else {"ab": None}
        runs = {
            phase: run_phase(phase, url, config, out, workload, forced) for phase, forced in phases.items()
        }
        if config.ceiling:
            ceiling = stack.enter_context(ceiling_server(out / "logs"))
            servers["ceiling"] = {"url": ceiling.url, "pid": ceiling.pid}
            runs["ceiling"] = run_phase("ceiling", ceiling.url, config, out, workload, None)
    served = ", ".join(f"{n}={p}" for n, p in start.items()) if start else ""
    target = url if host else " ".join(["slimrec serve started here:", served, *serve_args])
    return finish_report(config, out, runs, names, listing, target, servers)


def finish_report(
    config: LoadConfig,
    out: Path,
    runs: dict[str, dict],
    names: list[str],
    listing: dict,
    target: str,
    servers: dict,
) -> tuple[dict, dict[str, Path]]:
    from slimrec.loadtest import report as rep

    rows, latencies = {}, {}
    for phase, run in runs.items():
        log = rep.read_request_log(run["request_logs"])
        by_variant, phase_latencies = rep.phase_rows(log, config.warmup_s)
        if phase == "ab":
            rows.update(by_variant)
            latencies.update(phase_latencies)
        else:  # one variant per phase (forced); requests answered by another one are failures already
            rows[phase] = by_variant.get(phase) or rep.summarize([], 0, 0, 0.0)
            latencies[phase] = phase_latencies.get(phase, [])
            run["other_variants"] = {k: v["requests"] for k, v in by_variant.items() if k != phase}
        run["locust"] = rep.locust_totals(out / f"{phase}_locust.json")
    ceiling = rows.pop("ceiling", None)
    rows = {name: rows[name] for name in [*names, *sorted(set(rows) - set(names))] if name in rows}
    baseline = "full" if "full" in names else names[0]
    candidate = "compressed" if "compressed" in names else (names[1] if len(names) > 1 else baseline)
    settings = config.describe()
    settings["host"] = target
    settings["loadavg"] = "; ".join(
        f"{phase} {fmt_load(run['loadavg_before'])} / {fmt_load(run['loadavg_after'])}"
        for phase, run in runs.items()
    )
    notes = []
    if config.mode == "ab":
        split = ", ".join(f"{n} {w:g}" for n, w in (listing.get("split") or {}).items())
        notes.append(
            f"A/B phase: each variant's RPS is its share of the traffic (split {split}, by user), "
            "so the RPS ratio is the split, not relative capacity; compare latencies, or use "
            "per-variant."
        )
    if config.rate:
        notes.append(
            f"fixed rate: every phase was offered {config.rate:g} RPS, so RPS ratios near 1 only "
            "say the rate was held (below 1: the variant could not keep up); compare latencies "
            "here and capacity in a saturation run (no --rate)."
        )
    if any(run["generator_cpu_warning"] for run in runs.values()):
        notes.append(
            "locust warned that a load-generator process hit its CPU limit: RPS may be the "
            "generator's ceiling, not the server's (add --workers, or use wrk for ceilings)."
        )
    notes.append(
        "load generator and server share this machine's cores; compare ratios and medians of repeated runs."
    )
    extra = {"phases": runs, "split": listing.get("split"), "servers": servers, "notes": notes}
    report = rep.build_report(rows, settings, ceiling, baseline, candidate, extra=extra)
    paths = rep.write_report(out, report, latencies)
    return report, paths


def fmt_load(values) -> str:
    return "(" + ", ".join(f"{v:.2f}" for v in values) + ")"
