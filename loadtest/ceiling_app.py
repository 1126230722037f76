"""The HTTP ceiling: a FastAPI app that answers every recommendation with the same ten items.

    python -m uvicorn loadtest.ceiling_app:app --host 127.0.0.1 --port 8100 --log-level warning

Same routes, request parsing and typed response shape as `slimrec serve`, no model: driven by
the same load generator with the same settings, its RPS is what the framework, the server and
the generator allow on this machine, the figure the compressed variant is quoted against.
Standalone: imports nothing of slimrec.
"""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

VARIANT = "ceiling"


class CeilingRequest(BaseModel):
    """Parsed like the real request (user id, k); the rest of the body is accepted and ignored."""

    model_config = ConfigDict(extra="allow")
    user_id: str = Field(min_length=1, max_length=128)
    k: int = Field(10, ge=1, le=200)


class CeilingItem(BaseModel):
    item_id: str
    score: float | None
    title: str


class CeilingResponse(BaseModel):
    variant: str
    model_version: str
    user_id: str
    items: list[CeilingItem]
    fallback: str | None = None
    ignored_history: list[str] = Field(default_factory=list)
    request_id: str


ITEMS = [CeilingItem(item_id=str(i), score=1.0 - i / 100, title=f"Item {i}") for i in range(1, 11)]

app = FastAPI(title="slimrec ceiling", docs_url=None, redoc_url=None, openapi_url=None)


def answer(user_id: str) -> CeilingResponse:
    return CeilingResponse(
        variant=VARIANT, model_version="ceiling-0", user_id=user_id, items=ITEMS, request_id="ceiling"
    )


@app.post("/v1/recommend")
async def recommend(request: CeilingRequest) -> CeilingResponse:
    return answer(request.user_id)


@app.get("/v1/users/{user_id:path}/recommendations")  # ids may hold "/", as on the real server
async def user_recommendations(user_id: str, k: int = 10) -> CeilingResponse:
    return answer(user_id)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/readyz")
async def readyz() -> dict[str, str]:
    return {"status": "ready"}
