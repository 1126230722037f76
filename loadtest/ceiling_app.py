"""The trivial endpoint: the HTTP floor that a recommendation's cost is quoted against.

    python -m uvicorn slimrec.loadtest.ceiling_app:app --host 127.0.0.1 --port 8100 \\
        --loop uvloop --http httptools --workers 1 --no-access-log --log-level warning

Fixed by issue 16 so that the denominator does not move: an `async def` POST route on FastAPI
that awaits the body and returns a constant ten-item JSON answer (orjson-encoded once, at import),
sent as `Response(body, media_type="application/json")`; uvicorn with uvloop and httptools, one
worker, access log off (loadtest.processes.ceiling_server starts it so). No parsing, no
validation, no model: what a request costs the framework and the server on this machine. The
answer has the real one's shape (variant, items with ids and scores), so the locustfile's checks
pass. Standalone: imports nothing of slimrec.
"""

from __future__ import annotations

import orjson
from fastapi import FastAPI, Request, Response

VARIANT = "ceiling"

BODY = orjson.dumps(
    {
        "variant": VARIANT,
        "model_version": "ceiling-0",
        "user_id": "ceiling",
        "items": [{"item_id": str(i), "score": 1.0 - i / 100, "title": f"Item {i}"} for i in range(1, 11)],
        "fallback": None,
        "ignored_history": [],
        "request_id": "ceiling",
    }
)

app = FastAPI(title="slimrec trivial endpoint", docs_url=None, redoc_url=None, openapi_url=None)


@app.post("/v1/recommend")
async def recommend(request: Request) -> Response:
    await request.body()
    return Response(BODY, media_type="application/json")


@app.get("/v1/users/{user_id:path}/recommendations")  # the locust mix's GET route: same constant answer
async def user_recommendations(user_id: str) -> Response:
    return Response(BODY, media_type="application/json")


@app.get("/healthz")
async def healthz() -> Response:
    return Response(b'{"status":"ok"}', media_type="application/json")


@app.get("/readyz")
async def readyz() -> Response:
    return Response(b'{"status":"ready"}', media_type="application/json")
