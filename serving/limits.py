"""Overload and bad-input guards in front of the handlers (pure ASGI: they run before any parsing).

- `AdmissionMiddleware`: at most `max_in_flight` recommendation requests are handled at once.
  One more is answered 503 with `Retry-After` at once: no queue that grows with the load, so
  an overloaded server stays fast for the requests it admits and flat in memory. Admitted
  requests get a deadline (`request.state.deadline`, event-loop time) that the handler
  enforces with a 504.
- `json_too_deep`: request bodies nest 2 levels (object -> list -> string); a body nested too
  deeply for the JSON decoder is a 422 naming the problem, not a generic parse error.
"""

from __future__ import annotations

import asyncio
import json

from slimrec.serving.metrics import Metrics

LIMITED_PREFIXES = ("/v1/recommend", "/v1/users/")  # admin, health and metrics stay reachable
MAX_JSON_DEPTH = 32  # bodies with more brackets than this are checked for excessive nesting


async def send_json_error(
    send, status: int, detail: str, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A complete JSON `{"detail": ...}` response, sent straight to the ASGI `send`."""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def json_too_deep(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `body` is JSON nested too deeply to parse (past the interpreter's recursion limit).

    Fewer than `limit` brackets cannot nest that deep, so normal bodies cost two `bytes.count`;
    others are parsed once by the C decoder, which stops with RecursionError on deep nesting
    (linear time, no Python-level scan). Malformed JSON is left to the app (400).

    Example:
        >>> json_too_deep(b'{"history": ["a"]}'), json_too_deep(b"[" * 5000 + b"]" * 5000)
        (False, True)
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    try:
        json.loads(body)
    except RecursionError:
        return True
    except ValueError:
        pass  # malformed or undecodable: the app answers 400 with the reason
    return False


class AdmissionMiddleware:
    """Admit at most `limit` recommendation requests at once; refuse the rest with 503 + Retry-After.

    Args:
        app: the ASGI app.
        limit: most requests handled at once (`Settings.max_in_flight`).
        timeout_s: deadline given to each admitted request (`Settings.request_timeout_ms`).
        retry_after_s: the `Retry-After` value of a refusal.
        metrics: where the in-flight gauge and the refusal counter live.
    """

    def __init__(self, app, limit: int, timeout_s: float, retry_after_s: int, metrics: Metrics):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s
        self.retry_after, self.metrics = str(retry_after_s), metrics
        self.in_flight = 0
        metrics.in_flight.set_function(lambda: self.in_flight)  # read when scraped, not per request

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith(LIMITED_PREFIXES):
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            self.metrics.overload.inc()
            return await send_json_error(
                send,
                503,
                f"overloaded: {self.limit} requests in flight; retry after {self.retry_after} s",
                {"Retry-After": self.retry_after},
            )
        self.in_flight += 1
        scope.setdefault("state", {})["deadline"] = asyncio.get_running_loop().time() + self.timeout_s
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
