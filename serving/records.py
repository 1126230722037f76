"""The shapes of the outcome log's records: one exposure per answered recommendation, one
record per received event, one per split in force. `slimrec experiment report` joins them.

Times are Unix seconds. An exposure's `time` is the request's own clock when it sent one
(a replay's time), else the server's; an event's `time` is its own timestamp. `logged_at`
is always the server's clock, and orders records written at the same `time`.
"""

from __future__ import annotations

import os
import socket
import time

HOST = socket.gethostname()
PID = os.getpid()  # read at import: uvicorn workers import this module after they fork


def exposure_record(
    *,
    at: float | None,
    request_id: str,
    user_id: str,
    arm: str,
    variant: str,
    model_version: str,
    split_version: int,
    fallback: str | None,
    k: int,
    items: list[dict],
    latency_ms: float,
) -> dict:
    """What was shown to whom, by which model, under which split; `items` as in the response
    (`item_id`, `score`), logged with their 1-based positions."""
    now = time.time()
    return {
        "kind": "exposure",
        "time": now if at is None else at,
        "logged_at": now,
        "request_id": request_id,
        "user_id": user_id,
        "arm": arm,
        "variant": variant,
        "model_version": model_version,
        "split_version": split_version,
        "fallback": fallback,
        "k": k,
        "items": [
            {"item_id": item["item_id"], "position": position, "score": item["score"]}
            for position, item in enumerate(items, start=1)
        ],
        "latency_ms": latency_ms,
        "host": HOST,
        "pid": PID,
    }


def event_record(
    *,
    event_id: str,
    user_id: str,
    item_id: str,
    timestamp: float,
    type: str,
    request_id: str | None,
    known_item: bool,
    in_history: bool,
) -> dict:
    """A received interaction; `in_history`: it entered the user's live history (replayed at restart)."""
    return {
        "kind": "event",
        "time": timestamp,
        "logged_at": time.time(),
        "event_id": event_id,
        "user_id": user_id,
        "item_id": item_id,
        "type": type,
        "request_id": request_id,
        "known_item": known_item,
        "in_history": in_history,
        "host": HOST,
        "pid": PID,
    }


def split_record(version: int, weights: dict[str, float], source: str) -> dict:
    """The split in force from now on; `source`: startup, stored or admin."""
    now = time.time()
    return {
        "kind": "split",
        "time": now,
        "logged_at": now,
        "version": version,
        "weights": dict(weights),
        "source": source,
        "host": HOST,
        "pid": PID,
    }
