"""Realistic traffic against `slimrec serve`: Zipf-skewed known users, new users with histories, a k mix.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 30s \\
        [--workload runs/x/workload.json] [--force-variant compressed] [--target-rps 200]

Every request is named by the variant that answered it (`recommend known [full]`), so locust's
stats, CSVs and the per-request log are per variant. Answers are checked (200, a variant, items
unless it is the popularity fallback, the forced variant when one is forced); a bad one is a
failure with its reason. Ids come from `--workload` (written by `slimrec loadtest` from an
artifact's catalogue.json) or, without it, from the catalogue of a variant listed by
GET /v1/variants when the server runs on this machine. HTTP only: nothing of the server is imported.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from urllib.parse import quote

import gevent
from locust import FastHttpUser, events, task
from locust.runners import STATE_CLEANUP, STATE_STOPPED, STATE_STOPPING, WorkerRunner
from slimrec.loadtest.workload import DEFAULT_K_MIX, RequestMix, Workload, ZipfSampler, workload_from_server

VARIANT_HEADER = "X-Slimrec-Variant"


@events.init_command_line_parser.add_listener
def add_arguments(parser):
    group = parser.add_argument_group("slimrec")
    group.add_argument("--workload", default="", help="workload JSON (user ids, item ids, genres)")
    group.add_argument("--force-variant", default="", help=f"send {VARIANT_HEADER}: NAME on each request")
    group.add_argument(
        "--target-rps",
        type=float,
        default=0.0,
        help="total offered RPS (constant throughput per user: target-rps / -u; "
        "distributed workers need the master's -u too); 0 = no think time",
    )
    group.add_argument("--max-requests", type=int, default=0, help="stop after N requests; 0 = no cap")
    group.add_argument(
        "--request-log-dir", default="", help="write one CSV row per request here (one file per process)"
    )
    group.add_argument(
        "--new-user-share",
        type=float,
        default=0.2,
        help="share of requests from unknown users with a history",
    )
    group.add_argument(
        "--genre-share", type=float, default=0.1, help="share of known-user requests with a genre filter"
    )
    group.add_argument("--k-mix", default=DEFAULT_K_MIX, help="K:WEIGHT,... for the k of each request")
    group.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent of user and item popularity")
    group.add_argument(
        "--workload-seed",
        type=int,
        default=0,
        help="seed of the popularity ranking (the same on every worker)",
    )


class Traffic:
    """Per-process state built once from the options: the ids, the samplers and the mix."""

    _instance: Traffic | None = None

    def __init__(self, options, host: str):
        workload = Workload.load(options.workload) if options.workload else workload_from_server(host)
        self.workload = workload
        self.users = ZipfSampler(workload.user_ids, options.zipf, options.workload_seed)
        self.items = ZipfSampler(workload.item_ids, options.zipf, options.workload_seed + 1)
        self.mix = RequestMix(options.new_user_share, options.genre_share, options.k_mix)

    @classmethod
    def get(cls, environment) -> Traffic:
        if cls._instance is None:
            cls._instance = cls(environment.parsed_options, environment.host)
        return cls._instance


class RecommendUser(FastHttpUser):
    """One client: mostly POST /v1/recommend, sometimes the GET form for a known user."""

    def on_start(self):
        options = self.environment.parsed_options
        self.traffic = Traffic.get(self.environment)
        self.rng = random.Random()
        self.forced = options.force_variant or None
        self.headers = {VARIANT_HEADER: self.forced} if self.forced else {}
        users = max(1, options.num_users or 1)
        # A fixed rate: each user sends one request per period, at a random phase of its own.
        # (locust's constant_throughput paces every user from its spawn time: users spawned
        # together sent their requests in bursts of `users`, which the batcher ran as one batch,
        # so a fixed rate measured burst latency.)
        self.period = users / options.target_rps if options.target_rps > 0 else None
        if self.period is not None:
            self.next_at = time.monotonic() + self.rng.uniform(0.0, self.period)
            gevent.sleep(self.next_at - time.monotonic())

    def wait_time(self):
        if self.period is None:
            return 0.0
        now = time.monotonic()
        # The next slot of this user's schedule; after a stall, restart from now, not in a burst.
        self.next_at = max(self.next_at + self.period, now - self.period)
        return max(0.0, self.next_at - now)

    @task(9)
    def recommend(self):
        traffic = self.traffic
        kind, body = traffic.mix.draw(self.rng, traffic.workload, traffic.users, traffic.items)
        with self.client.post(
            "/v1/recommend", json=body, headers=self.headers, name=f"recommend {kind}", catch_response=True
        ) as resp:
            # A genre filter may leave nothing a user has not seen (a small catalogue): empty is right.
            self.check(resp, f"recommend {kind}", may_be_empty=kind == "genre")

    @task(1)
    def user_recommendations(self):
        user = self.traffic.users.sample(self.rng)
        k = self.rng.choices(self.traffic.mix.ks, self.traffic.mix.k_weights)[0]
        with self.client.get(
            f"/v1/users/{quote(user, safe='')}/recommendations?k={k}",  # ids may hold "/", "?", "%", spaces
            headers=self.headers,
            name="user recs",
            catch_response=True,
        ) as resp:
            self.check(resp, "user recs")

    def check(self, resp, name: str, may_be_empty: bool = False) -> None:
        """Name the request by the variant that served it, and fail bad answers with a reason."""
        answer = None
        if resp.status_code == 200:
            try:
                answer = resp.json()
            except ValueError:
                answer = None
        variant = (answer or {}).get("variant") if isinstance(answer, dict) else None
        if not variant and resp.headers:
            variant = resp.headers.get(VARIANT_HEADER)
        variant = variant or self.forced or "?"
        resp.request_meta["name"] = f"{name} [{variant}]"
        resp.request_meta["context"] = {**resp.request_meta.get("context", {}), "variant": variant}
        if resp.status_code != 200:
            resp.failure(f"HTTP {resp.status_code}: {(resp.text or '')[:200]}")
        elif not isinstance(answer, dict):
            resp.failure("answer is not a JSON object")
        elif not answer.get("variant"):
            resp.failure("answer names no variant")
        elif self.forced and answer["variant"] != self.forced:
            resp.failure(f"asked for {self.forced}, answered by {answer['variant']}")
        elif not answer.get("items") and answer.get("fallback") is None and not may_be_empty:
            resp.failure("no items and no fallback")
        else:
            resp.success()


class RequestLog:
    """One CSV per generator process: start time, variant, name, latency (ms), ok. Exact percentiles later."""

    def __init__(self):
        self.file = None

    def write(self, environment, name, response_time, exception, context, start_time) -> None:
        if self.file is None:
            directory = getattr(environment.parsed_options, "request_log_dir", "")
            if not directory:
                return
            Path(directory).mkdir(parents=True, exist_ok=True)
            self.file = open(Path(directory) / f"requests-{os.getpid()}.csv", "a", buffering=1 << 16)
            if self.file.tell() == 0:
                self.file.write("start_time,variant,name,response_ms,ok\n")
        variant = (context or {}).get("variant", "?")
        self.file.write(f"{start_time:.6f},{variant},{name},{response_time:.3f},{0 if exception else 1}\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


request_log = RequestLog()


@events.init.add_listener
def on_init(environment, **_kwargs):
    @environment.events.request.add_listener
    def on_request(name, response_time, exception, context=None, start_time=None, **_kw):
        request_log.write(environment, name, response_time, exception, context, start_time or 0.0)

    if not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(stop_at_request_cap, environment)


@events.test_stop.add_listener
def on_test_stop(**_kwargs):
    request_log.close()  # reopened in append mode if the run goes on


def stop_at_request_cap(environment) -> None:
    """A hard bound besides --run-time: quit once the total request count reaches --max-requests."""
    cap = environment.parsed_options.max_requests if environment.parsed_options else 0
    if cap <= 0:
        return
    while True:
        # Every 10 ms: at 0.1 s a fast server overshot a cap of 40 by 160 requests (CI, 2 cores).
        gevent.sleep(0.01)
        runner = environment.runner
        if runner is None or runner.state in (STATE_STOPPING, STATE_STOPPED, STATE_CLEANUP):
            return
        if (sent := runner.stats.total.num_requests) >= cap:
            print(f"slimrec: request cap reached ({sent} >= {cap}), stopping", flush=True)
            runner.quit()
            return
