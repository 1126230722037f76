"""Public HTTP endpoints: recommendations, variants, health, readiness and metrics."""

from __future__ import annotations

import random
import re
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from serving.batcher import BatcherClosed
from serving.deps import VARIANT_HEADER, ForcedVariantDep, MetricsDep, ReadyServiceDep, ServiceDep
from serving.queries import Answer, QueryError, build_query
from serving.queries import Query as ModelQuery
from serving.router import assign_variant
from serving.schemas import (
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    VariantInfo,
    VariantsResponse,
)
from serving.service import Service
from serving.settings import MAX_K
from serving.shadow import overlap_at_k, rank_biased_overlap
from serving.variants import Variant

router = APIRouter()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers HTTP."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(service: ServiceDep):
    """Readiness: 200 once every variant is loaded and verified; 503 while loading or draining."""
    if not service.ready:
        return JSONResponse({"status": "not ready"}, status_code=503)
    return {"status": "ready", "variants": {n: s.variant.version for n, s in service.variants.items()}}


@router.get("/metrics")
async def metrics(m: MetricsDep) -> Response:
    """Prometheus text exposition."""
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/variants")
async def list_variants(service: ReadyServiceDep) -> VariantsResponse:
    """Loaded variants with their manifest summaries (sizes, metrics, promotable), and the split."""
    infos = [VariantInfo(weight=service.split.get(name, 0.0), **served.variant.describe())
             for name, served in service.variants.items()]
    return VariantsResponse(variants=infos, split=service.split,
                            overrides_allowed=service.settings.overrides_allowed,
                            shadow_fraction=service.settings.shadow_fraction)


@router.post("/v1/recommend")
async def recommend(body: RecommendRequest, service: ReadyServiceDep, forced: ForcedVariantDep,
                    request: Request, response: Response, background: BackgroundTasks) -> RecommendResponse:
    """Top-k items for a user: known users by id; new users by `history` and optional features."""
    return await serve(service, body, forced, request, response, background)


@router.get("/v1/users/{user_id}/recommendations")
async def user_recommendations(
        user_id: Annotated[str, Path(min_length=1, max_length=128)], service: ReadyServiceDep,
        forced: ForcedVariantDep, request: Request, response: Response, background: BackgroundTasks,
        k: Annotated[int, Query(ge=1, le=MAX_K)] = 10, exclude_seen: bool = True,
        include_genres: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI copies defaults)
        exclude_genres: Annotated[list[str], Query()] = []) -> RecommendResponse:  # noqa: B006
    """The same as POST /v1/recommend without a history (unknown users get the fallback)."""
    body = RecommendRequest(user_id=user_id, k=k, exclude_seen=exclude_seen,
                            include_genres=include_genres, exclude_genres=exclude_genres)
    return await serve(service, body, forced, request, response, background)


async def serve(service: Service, body: RecommendRequest, forced: str | None, request: Request,
                response: Response, background: BackgroundTasks) -> RecommendResponse:
    """Route, build the query, await the batcher, answer; maybe schedule a shadow comparison."""
    started = time.perf_counter()
    if len(body.history) > service.settings.max_history:
        raise HTTPException(422, f"history: {len(body.history)} items, at most "
                                 f"{service.settings.max_history} allowed (send the most recent ones)")
    name = forced or assign_variant(body.user_id, service.split, service.settings.salt)
    request.state.variant = name
    served = service.variants[name]  # build and submit against the same Served, even mid-reload
    query, answer = await _answer(served, body)
    request_id = _request_id(request)
    result = to_response(served.variant, body.user_id, answer, query.ignored_history, request_id)
    timings = {**answer.timings, "total": time.perf_counter() - started}
    response.headers["Server-Timing"] = ", ".join(f"{s};dur={v * 1000:.3f}" for s, v in timings.items())
    response.headers[VARIANT_HEADER] = name
    response.headers["X-Request-ID"] = request_id
    service.metrics.record_answer(name, answer.timings, answer.fallback)
    if result.ignored_history:
        service.metrics.ignored_history.labels(name).inc(len(result.ignored_history))
    fraction = service.settings.shadow_fraction
    if answer.fallback is None and fraction > 0 and random.random() < fraction:
        partner = service.shadow_partner(name)
        if partner is not None:  # runs after the response is sent (Starlette BackgroundTasks)
            background.add_task(shadow_compare, service, name, partner, body,
                                [item.item_id for item in result.items])
    return result


async def _answer(served, body: RecommendRequest) -> tuple[ModelQuery, Answer]:
    try:
        query = build_query(served.variant, body.user_id, body.k, body.exclude_seen, body.history,
                            body.features(), body.include_genres, body.exclude_genres,
                            reject_unknown_items=body.unknown_items == "reject")
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from exc
    try:
        return query, await served.batcher.submit(query)
    except BatcherClosed as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc


def to_response(variant: Variant, user_id: str, answer: Answer, ignored_history: list[str],
                request_id: str) -> RecommendResponse:
    """Raw ids, titles and scores for the answer's item indices."""
    ids, titles = variant.item_ids, variant.titles
    scores = answer.scores.tolist() if answer.scores is not None else [None] * len(answer.items)
    items = [ScoredItem(item_id=ids[i], score=s, title=titles[i])
             for i, s in zip(answer.items.tolist(), scores, strict=True)]
    return RecommendResponse(variant=variant.name, model_version=variant.version, user_id=user_id,
                             items=items, fallback=answer.fallback, ignored_history=ignored_history,
                             request_id=request_id)


async def shadow_compare(service: Service, primary: str, partner: str, body: RecommendRequest,
                         primary_items: list[str]) -> None:
    """Answer the same request with the partner variant and record top-k agreement."""
    served = service.variants.get(partner)
    outcome = service.metrics.shadow.labels(primary, partner, "compared")
    try:
        answer = (await _answer(served, body))[1] if served else None
    except Exception:  # a shadow must never hurt the primary path; count it and move on
        answer = None
    if answer is None:
        service.metrics.shadow.labels(primary, partner, "error").inc()
        return
    items = [served.variant.item_ids[i] for i in answer.items.tolist()]
    metrics = service.metrics
    metrics.shadow_overlap.labels(primary, partner).observe(overlap_at_k(primary_items, items, body.k))
    metrics.shadow_rbo.labels(primary, partner).observe(rank_biased_overlap(primary_items, items))
    outcome.inc()


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex
