"""The server's CPU time over a measured window: the figure that decides, where RPS is noise.

On a shared machine a server's RPS moves with whatever else runs; the CPU seconds it spends per
request do not (much). Three readers, each `read() -> CPU seconds so far` (monotone):

- `ProcessTreeCPU(pid)`: a server started here. user + system time of the process and every live
  descendant (uvicorn workers, model processes, a local Ray node), plus the children they have
  already reaped (cutime/cstime), so a child that exits inside the window still counts.
- `MetricsCPU(url)`: someone else's server. The sum of every `process_cpu_seconds_total` sample on
  its `/metrics` (one per process in multiprocess mode, if the server exports it per pid).
- `listener_cpu(url)`: a loopback server that exports no process CPU: the processes listening on
  its port and their descendants, from /proc (for a Ray node, the whole node under its raylet).

`CpuSampler` reads one in a thread every `interval_s` while locust runs; the report takes the
samples inside the measured window and counts the requests that ended between them.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil

METRIC_NAMES = ("process_cpu_seconds_total", "slimrec_process_cpu_seconds_total")
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


class ProcessTreeCPU:
    """CPU seconds of a process, its live descendants and the children they reaped."""

    def __init__(self, pid: int, what: str = ""):
        self.root = psutil.Process(pid)
        self.description = what or f"pid {pid} and its children (/proc)"
        self.processes = 0

    def read(self) -> float:
        total, count = 0.0, 0
        try:
            tree = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess as exc:
            raise RuntimeError(f"server process {self.root.pid} is gone") from exc
        for process in tree:
            try:
                t = process.cpu_times()
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue  # exited between the listing and the read: its time is in its parent's cutime
            total += t.user + t.system + t.children_user + t.children_system
            count += 1
        self.processes = count
        return total


def parse_process_cpu(exposition: str) -> tuple[float, int] | None:
    """(sum, number of samples) of the process CPU counter in a Prometheus text exposition, or None.

    `process_cpu_seconds_total` (prometheus_client's process collector, one sample per process
    when labelled by pid) if present, else `slimrec_process_cpu_seconds_total` (a multiprocess
    counter summed over workers); never both, which would count the same seconds twice.

    Example:
        >>> text = 'process_cpu_seconds_total{pid="7"} 1.5\\nprocess_cpu_seconds_total{pid="8"} 2\\n'
        >>> parse_process_cpu('# TYPE process_cpu_seconds_total counter\\n' + text)
        (3.5, 2)
    """
    found: dict[str, list[float]] = {}
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in METRIC_NAMES:
            found.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    for name in METRIC_NAMES:
        if name in found:
            return sum(found[name]), len(found[name])
    return None


class MetricsCPU:
    """The sum of the process CPU counters on a server's /metrics."""

    def __init__(self, url: str):
        self.url = url.rstrip("/") + "/metrics"
        self.processes = 0
        self.description = f"sum of process_cpu_seconds_total on {self.url}"

    def read(self) -> float:
        with urllib.request.urlopen(self.url, timeout=10) as response:  # noqa: S310 (the tested server)
            parsed = parse_process_cpu(response.read().decode())
        if parsed is None:
            raise RuntimeError(f"{self.url} no longer exports process_cpu_seconds_total")
        total, self.processes = parsed
        return total


def listener_cpu(url: str) -> ProcessTreeCPU | None:
    """A reader for the loopback server listening at `url`'s port, or None (not loopback, or not found).

    The root is the highest process holding the listening socket (uvicorn's parent binds it and
    its workers inherit it; the system-wide listing names only one of them). A Ray Serve proxy is
    a child of its node's raylet, beside the replicas: the root is then the raylet (or the
    `slimrec serve` that started the node), so the whole node counts.
    """
    parts = urlsplit(url)
    if parts.hostname not in LOOPBACK:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        pid = next(
            c.pid
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
        )
        root = psutil.Process(pid)
        while (parent := root.parent()) is not None and listens(parent, port):
            root = parent
        if root.cmdline()[:1] and root.cmdline()[0].startswith("ray::"):
            raylet = root.parent()
            if raylet is not None and raylet.name() == "raylet":
                driver = raylet.parent()  # `slimrec serve --engine ray` started the node: GCS, dashboard too
                if (
                    driver is not None
                    and "serve" in driver.cmdline()
                    and "slimrec" in " ".join(driver.cmdline())
                ):
                    return ProcessTreeCPU(driver.pid, f"slimrec serve pid {driver.pid}, its Ray node (/proc)")
                return ProcessTreeCPU(raylet.pid, f"the Ray node under raylet pid {raylet.pid} (/proc)")
    except (StopIteration, psutil.Error):
        return None
    return ProcessTreeCPU(root.pid, f"pid {root.pid} listening on port {port} and its children (/proc)")


def listens(process: psutil.Process, port: int) -> bool:
    try:
        connections = process.net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in connections)


def server_cpu_reader(url: str, pid: int | None):
    """The best CPU reader for a server: its process tree if we started it (pid), else its /metrics,
    else the loopback listener's tree; None if none of these is available."""
    if pid is not None:
        return ProcessTreeCPU(pid, f"pid {pid} (started here) and its children (/proc)")
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=10) as response:  # noqa: S310
            exported = parse_process_cpu(response.read().decode()) is not None
    except OSError:
        exported = False
    return MetricsCPU(url) if exported else listener_cpu(url)


@dataclass
class CpuWindow:
    """CPU spent over a wall-clock window, and per request."""

    source: str
    cpu_s: float
    wall_s: float
    requests: int
    processes: int

    @property
    def us_per_request(self) -> float | None:
        return self.cpu_s / self.requests * 1e6 if self.requests else None

    @property
    def cores_busy(self) -> float | None:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else None

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "requests": self.requests,
            "processes": self.processes,
            "us_per_request": self.us_per_request,
            "cores_busy": self.cores_busy,
        }


class CpuSampler:
    """Reads a CPU reader every `interval_s` in a daemon thread: [(time.time(), CPU seconds)]."""

    def __init__(self, reader, interval_s: float = 0.5):
        self.reader = reader
        self.interval_s = interval_s
        self.samples: list[tuple[float, float]] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        stopping = False
        while True:
            try:
                self.samples.append((time.time(), self.reader.read()))
            except (RuntimeError, OSError) as exc:  # the server went away: keep what was read
                self.error = str(exc)
                return
            if stopping:
                return
            stopping = self._stop.wait(self.interval_s)

    def start(self) -> CpuSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        """One last sample, then the thread ends (joined under a deadline)."""
        self._stop.set()
        self._thread.join(30)

    def __enter__(self) -> CpuSampler:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def window(self, start: float, end: float, request_ends) -> CpuWindow | None:
        """See cpu_window."""
        return cpu_window(
            self.samples, start, end, request_ends, self.reader.description, self.reader.processes
        )


def cpu_window(
    samples: list[tuple[float, float]],
    start: float,
    end: float,
    request_ends,
    source: str,
    processes: int = 0,
) -> CpuWindow | None:
    """The CPU between the first and last samples inside [start, end] (epoch seconds), over the
    requests that ended between those two samples; None if fewer than two samples fall inside.

    Example: samples at 0.5 s steps, 0.4 CPU seconds each step, 10 requests ending per step:
        >>> w = cpu_window([(t / 2, 0.4 * t) for t in range(10)], 0.7, 4.2, [i / 20 for i in range(100)], "x")
        >>> round(w.wall_s, 3), round(w.cpu_s, 3), w.requests, round(w.us_per_request), round(w.cores_busy, 3)
        (3.0, 2.4, 61, 39344, 0.8)
    """
    inside = [(t, cpu) for t, cpu in samples if start <= t <= end]
    if len(inside) < 2:
        return None
    (t0, c0), (t1, c1) = inside[0], inside[-1]
    requests = sum(1 for t in request_ends if t0 <= t <= t1)
    return CpuWindow(source, c1 - c0, t1 - t0, requests, processes)
