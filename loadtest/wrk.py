"""wrk as the load generator: POST /v1/recommend for known users, k=10, at saturation.

A cheap generator (about 19 us of CPU a request against locust's ~70), so that on a small
machine the server, not the generator, is what a phase measures. wrk runs a Lua script written
here: it prepares one request per known user of the workload (a seeded shuffle, k=10, the
forced variant's header) once, cycles through them, and at the end prints its own summary as a
JSON line (requests, errors, latency percentiles from its histogram), beside wrk's usual text
(parsed too, `--latency`). wrk does not read the answers: one request is checked before the
phase (status, the forced variant), and non-2xx answers and socket errors count as failures.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import urllib.request
from pathlib import Path

WRK_SUMMARY = "SLIMREC_WRK "
TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # -> milliseconds
REQUEST_TIMEOUT_S = 10

LUA = """-- Written by slimrec loadtest: POST /v1/recommend for %(users)d known users, k=%(k)d, cycled.
local bodies = {
%(bodies)s
}
local headers = {%(headers)s}
local prepared = {}
local i = 0
local threads = 0

setup = function(thread)  -- each thread starts at another place in the cycle
  thread:set("offset", threads * 97)
  threads = threads + 1
end

init = function(args)
  for n, body in ipairs(bodies) do
    prepared[n] = wrk.format("POST", "/v1/recommend", headers, body)
  end
  i = (offset or 0) %% #prepared
end

request = function()
  i = i %% #prepared + 1
  return prepared[i]
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(marker)s{"requests": %%d, "duration_us": %%d, "bytes": %%d, "connect": %%d, "read": %%d, '
    .. '"write": %%d, "status": %%d, "timeout": %%d, "mean_us": %%.1f, "max_us": %%d, '
    .. '"p50_us": %%d, "p90_us": %%d, "p95_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency.mean, latency.max, latency:percentile(50), latency:percentile(90),
    latency:percentile(95), latency:percentile(99)))
end
"""


def wrk_path() -> str:
    """wrk's path; ValueError with what to do when it is not installed."""
    path = shutil.which("wrk")
    if path is None:
        raise ValueError(
            "--generator wrk: wrk is not on PATH; install it (apt-get install wrk, brew install wrk) "
            "or use --generator locust"
        )
    return path


def lua_string(text: str) -> str:
    """A Lua double-quoted string literal: printable ASCII as is, every other byte as \\ddd."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        out.append(char if 32 <= byte < 127 and char not in '"\\' else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def request_bodies(user_ids: list[str], k: int = 10, seed: int = 0) -> list[str]:
    """The JSON bodies wrk cycles through: every known user once, in a seeded shuffle."""
    users = list(user_ids)
    random.Random(seed).shuffle(users)
    return [json.dumps({"user_id": user, "k": k}, separators=(",", ":")) for user in users]


def write_script(path: Path, user_ids: list[str], forced: str | None, k: int = 10, seed: int = 0) -> Path:
    """The Lua script for one phase (the forced variant's header on every request)."""
    headers = {"Content-Type": "application/json"}
    if forced:
        headers["X-Slimrec-Variant"] = forced
    bodies = request_bodies(user_ids, k, seed)
    path.write_text(
        LUA
        % {
            "users": len(bodies),
            "k": k,
            "bodies": ",\n".join(f"  {lua_string(b)}" for b in bodies),
            "headers": ", ".join(f"[{lua_string(n)}] = {lua_string(v)}" for n, v in headers.items()),
            "marker": WRK_SUMMARY,
        }
    )
    return path


def wrk_command(url: str, script: Path, threads: int, connections: int, seconds: float) -> list[str]:
    """wrk for `seconds` (whole seconds: wrk takes no fractions), latency distribution on."""
    return [
        wrk_path(),
        "-t",
        str(threads),
        "-c",
        str(connections),
        "-d",
        f"{max(1, math.ceil(seconds))}s",
        "--timeout",
        f"{REQUEST_TIMEOUT_S}s",
        "--latency",
        "-s",
        str(script),
        url,
    ]


def check_one_request(url: str, body: str, forced: str | None) -> None:
    """POST one of the script's bodies the way wrk will; RuntimeError unless it is answered right."""
    headers = {"Content-Type": "application/json", **({"X-Slimrec-Variant": forced} if forced else {})}
    request = urllib.request.Request(f"{url}/v1/recommend", body.encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 (the tested server)
            answer = json.loads(response.read())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"POST {url}/v1/recommend {body}: {exc}") from exc
    if not answer.get("items") or (forced and answer.get("variant") != forced):
        raise RuntimeError(
            f"POST {url}/v1/recommend {body} (variant {forced or 'any'}): unexpected answer {answer!r:.300}"
        )


def parse_time_ms(text: str) -> float:
    """wrk's '1.23ms', '456.00us', '1.50s', '1.00m' -> milliseconds."""
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not match:
        raise ValueError(f"wrk output: not a time: {text!r}")
    return float(match.group(1)) * TIME_UNITS[match.group(2)]


def parse_wrk_output(text: str) -> dict:
    """wrk's output (run with --latency) as numbers; the script's JSON summary under "summary".

    Returns requests, seconds, rps (wrk's Requests/sec), latency mean/stdev/max (ms), the latency
    distribution {"50": ms, "75": ms, "90": ms, "99": ms}, socket errors and non_2xx.
    """
    result: dict = {"errors": {"connect": 0, "read": 0, "write": 0, "timeout": 0}, "non_2xx": 0}
    match = re.search(r"^\s*(\d+) requests in ([0-9.]+\w+), ", text, re.M)
    if not match:
        raise ValueError(f"wrk output has no 'N requests in T' line:\n{text[-1000:]}")
    result["requests"] = int(match.group(1))
    result["seconds"] = parse_time_ms(match.group(2)) / 1000
    match = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    result["rps"] = float(match.group(1)) if match else None
    match = re.search(r"^\s+Latency\s+(\S+)\s+(\S+)\s+(\S+)\s+", text, re.M)
    if match:
        result["latency_ms"] = dict(
            zip(("mean", "stdev", "max"), (parse_time_ms(v) for v in match.groups()), strict=True)
        )
    distribution = re.search(r"Latency Distribution\s*\n((?:\s+\d+(?:\.\d+)?%\s+\S+\s*\n)+)", text)
    if distribution:
        result["percentiles_ms"] = {
            p.rstrip("0").rstrip(".") if "." in p else p: parse_time_ms(t)
            for p, t in re.findall(r"([0-9.]+)%\s+(\S+)", distribution.group(1))
        }
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if match:
        result["errors"] = dict(
            zip(("connect", "read", "write", "timeout"), map(int, match.groups()), strict=True)
        )
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if match:
        result["non_2xx"] = int(match.group(1))
    for line in text.splitlines():
        if line.startswith(WRK_SUMMARY):
            result["summary"] = json.loads(line[len(WRK_SUMMARY) :])
    return result


def wrk_row(parsed: dict) -> dict:
    """A report row (see report.py) from parsed wrk output: the script's summary where present."""
    summary = parsed.get("summary")
    failures = parsed["non_2xx"] + sum(parsed["errors"].values())
    if summary:
        seconds = summary["duration_us"] / 1e6
        row = {
            "requests": summary["requests"],
            "failures": failures,
            "rps": summary["requests"] / seconds if seconds else 0.0,
            "seconds": seconds,
            "mean_ms": summary["mean_us"] / 1000,
            **{f"p{p}_ms": summary[f"p{p}_us"] / 1000 for p in (50, 90, 95, 99)},
            "max_ms": summary["max_us"] / 1000,
        }
    else:  # a script without our done(): wrk's text (no p95)
        percentiles = parsed.get("percentiles_ms", {})
        latency = parsed.get("latency_ms", {})
        row = {
            "requests": parsed["requests"],
            "failures": failures,
            "rps": parsed["requests"] / parsed["seconds"] if parsed["seconds"] else 0.0,
            "seconds": parsed["seconds"],
            "mean_ms": latency.get("mean", math.nan),
            "p50_ms": percentiles.get("50", math.nan),
            "p90_ms": percentiles.get("90", math.nan),
            "p95_ms": math.nan,
            "p99_ms": percentiles.get("99", math.nan),
            "max_ms": latency.get("max", math.nan),
        }
    return row
