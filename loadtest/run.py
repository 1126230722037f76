"""`slimrec loadtest`'s work: start what is needed, run locust headless per phase, write the report.

Every process started here (a `slimrec serve`, the ceiling app, locust, its master and workers,
wrk) listens on 127.0.0.1 only, runs under a deadline, and is stopped by its own pid, also when
something fails (loadtest.processes). The load generator is told when to stop twice: locust's
--run-time and a request cap (--max-requests in the locustfile); wrk's -d and the deadline.
The server's CPU time is read over each phase (loadtest.cpu): per request, it is the figure that
holds when the machine is busy.

Speaks HTTP to the server; imports nothing of it (nor locust: gevent's monkey-patching would
change this process's threads and subprocesses).
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from slimrec.loadtest import wrk
from slimrec.loadtest.cpu import CpuSampler, CpuWindow, ProcessTreeCPU, cpu_window, server_cpu_reader
from slimrec.loadtest.processes import Process, ceiling_server, free_port, slimrec_server, wait_ready
from slimrec.loadtest.workload import RequestMix, Workload, get_json, workload_from_server

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
LOCUST_START_S = 60.0  # import, workers connecting (--expect-workers-max-wait), first spawn, on a busy box
LOCUST_STOP_S = 30.0
MAX_RPS_PER_GENERATOR = 20_000  # above one locust process's ~13-14k/s: the default cap never binds early
CPU_SAMPLE_S = 0.5  # server CPU read this often during a locust phase
GENERATORS = ("locust", "wrk")


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
    generator: str = "locust"
    wrk_threads: int = 1

    def __post_init__(self):
        if self.mode not in ("per-variant", "ab"):
            raise ValueError(f"--mode must be per-variant or ab, got {self.mode!r}")
        if self.generator not in GENERATORS:
            raise ValueError(f"--generator must be locust or wrk, got {self.generator!r}")
        if self.generator == "wrk":
            if self.mode != "per-variant":
                raise ValueError(
                    "--generator wrk does not read answers, so it cannot tell variants apart "
                    "in --mode ab: use --mode per-variant, or --generator locust"
                )
            if self.rate is not None or self.workers:
                raise ValueError(
                    "--generator wrk runs at saturation in one process: --rate and "
                    "--workers go with --generator locust"
                )
            wrk.wrk_path()  # a clear error now, not after the server has started
            if not 1 <= self.wrk_threads <= self.users:
                raise ValueError(
                    f"--wrk-threads must be between 1 and --users ({self.users}), got {self.wrk_threads}"
                )
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
        if self.generator == "wrk":
            seconds = max(1, math.ceil(self.duration_s))
            settings["mix"] = "POST /v1/recommend, every known user in turn (a seeded shuffle), k=10"
            settings["duration"] = f"{seconds} s"
            settings["warmup"] = (
                f"a {max(1, math.ceil(self.warmup_s))} s wrk run before each measured one"
                if self.warmup_s
                else "none"
            )
            settings["generators"] = (
                f"wrk, {self.wrk_threads} thread{'s' if self.wrk_threads > 1 else ''}, "
                f"{self.users} connections"
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
    phase: str, url: str, config: LoadConfig, out: Path, workload: Path, forced: str | None, cpu=None
) -> dict:
    """One phase with the configured generator; `cpu` reads the server's CPU seconds (or None)."""
    if config.generator == "wrk":
        return run_wrk_phase(phase, url, config, out, workload, forced, cpu)
    return run_locust_phase(phase, url, config, out, workload, forced, cpu)


def run_wrk_phase(
    phase: str, url: str, config: LoadConfig, out: Path, workload: Path, forced: str | None, cpu=None
) -> dict:
    """A wrk warm-up run, then the measured one between two reads of the server's CPU."""
    script = wrk.write_script(out / f"wrk-{phase}.lua", Workload.load(workload).user_ids, forced)
    wrk.check_one_request(url, wrk.request_bodies(Workload.load(workload).user_ids)[0], forced)
    logs = out / "logs"
    loadavg_before = os.getloadavg()
    started = time.monotonic()

    def run_wrk(seconds: float, log: Path) -> str:
        command = wrk.wrk_command(url, script, config.wrk_threads, config.users, seconds)
        process = Process(command, log, echo=phase)
        try:
            rc = process.wait(seconds + LOCUST_STOP_S)
        finally:
            process.stop()
        if rc != 0:
            raise RuntimeError(f"wrk ({phase}) exited with {rc}:\n{process.tail()}")
        return log.read_text()

    if config.warmup_s:
        run_wrk(config.warmup_s, logs / f"wrk-{phase}-warmup.log")
    cpu_before, t_before = (cpu.read() if cpu else None), time.time()
    children_before = children_cpu_s()  # wrk is the only child this process reaps meanwhile
    text = run_wrk(config.duration_s, logs / f"wrk-{phase}.log")
    generator_cpu_s = children_cpu_s() - children_before
    cpu_after, t_after = (cpu.read() if cpu else None), time.time()
    parsed = wrk.parse_wrk_output(text)
    row = wrk.wrk_row(parsed)
    row["generator_cpu_us_per_request"] = generator_cpu_s / row["requests"] * 1e6 if row["requests"] else None
    window = None
    if cpu is not None:
        window = CpuWindow(
            cpu.description, cpu_after - cpu_before, t_after - t_before, row["requests"], cpu.processes
        ).to_dict()
    return {
        "generator": "wrk",
        "seconds": time.monotonic() - started,
        "loadavg_before": loadavg_before,
        "loadavg_after": os.getloadavg(),
        "generator_cpu_warning": False,
        "wrk": parsed,
        "row": row,
        "server_cpu": window,
    }


def children_cpu_s() -> float:
    """User + system seconds of this process's reaped children (getrusage RUSAGE_CHILDREN)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_locust_phase(
    phase: str, url: str, config: LoadConfig, out: Path, workload: Path, forced: str | None, cpu=None
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
    sampler = CpuSampler(cpu, CPU_SAMPLE_S) if cpu is not None else None
    try:
        if sampler is not None:
            sampler.start()
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
        if sampler is not None:
            sampler.stop()
    if rc != 0:
        raise RuntimeError(f"locust ({phase}) exited with {rc}:\n{master.tail()}")
    return {
        "generator": "locust",
        "cpu_samples": sampler.samples if sampler else [],
        "cpu_source": (cpu.description, cpu.processes) if cpu else None,
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
            cpu = ProcessTreeCPU(
                server.pid, f"slimrec serve (pid {server.pid}, started here) and its children (/proc)"
            )
        else:
            url = host.rstrip("/")
            wait_ready(url, None, timeout_s=10.0)
            cpu = server_cpu_reader(url, None)
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
            phase: run_phase(phase, url, config, out, workload, forced, cpu)
            for phase, forced in phases.items()
        }
        if config.ceiling:
            ceiling = stack.enter_context(ceiling_server(out / "logs"))
            servers["ceiling"] = {"url": ceiling.url, "pid": ceiling.pid}
            ceiling_cpu = ProcessTreeCPU(
                ceiling.pid, f"trivial endpoint (pid {ceiling.pid}, started here; /proc)"
            )
            runs["ceiling"] = run_phase("ceiling", ceiling.url, config, out, workload, None, ceiling_cpu)
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
        if run["generator"] == "wrk":  # no per-request log: wrk's own figures, CPU read around its run
            rows[phase] = dict(run["row"])
            latencies[phase] = []
        else:
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
            run["server_cpu"] = None
            if run["cpu_source"] is not None and log["start"].size:
                start, end, ends = rep.measured_window(log, config.warmup_s)
                window = cpu_window(run["cpu_samples"], start, end, ends, *run["cpu_source"])
                run["server_cpu"] = window.to_dict() if window else None
        if run["server_cpu"] and phase != "ab":
            rows[phase]["cpu_us_per_request"] = run["server_cpu"]["us_per_request"]
            rows[phase]["cores_busy"] = run["server_cpu"]["cores_busy"]
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
    sources = {run["server_cpu"]["source"] for run in runs.values() if run["server_cpu"]}
    if sources:
        notes.append(
            "server CPU: user + system seconds over the measured window, from "
            + "; ".join(sorted(sources))
            + ". CPU per request holds on a busy machine where RPS does not; 'cores busy' is CPU "
            "seconds per wall second."
        )
    missing = [phase for phase, run in runs.items() if not run["server_cpu"]]
    if missing:
        notes.append(
            f"server CPU not measured for {', '.join(missing)}: the server's /metrics exports no "
            "process_cpu_seconds_total and it is not a process on this machine's loopback (or the "
            "window held fewer than two CPU samples)."
        )
    if config.generator == "wrk":
        notes.append(
            "wrk does not read answers: one request per phase was checked before it (status, "
            "items, the forced variant); non-2xx answers and socket errors are the failures."
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
