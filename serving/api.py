"""Public HTTP endpoints: recommendations, variants, health, readiness and metrics.

Run-time failures of a variant's model do not fail requests: the request is answered by the
next loaded variant (`"fallback": "variant:NAME"`), else by the failed variant's popularity
list (`"fallback": "popular"`), and counted (`slimrec_model_errors_total`,
`slimrec_runtime_fallback_total`). Client errors (422) and the deadline (504) are not masked.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from slimrec.serving import observability
from slimrec.serving.batcher import BatcherClosed
from slimrec.serving.deps import (
    VARIANT_HEADER,
    VARIANT_HEADER_DOC,
    MetricsDep,
    ReadyServiceDep,
    ServiceDep,
    check_forced_variant,
    ready_service,
)
from slimrec.serving.direct import Handler, direct_route, recommend_body, user_query
from slimrec.serving.queries import Answer, QueryError, build_query, seen_items
from slimrec.serving.queries import Query as ModelQuery
from slimrec.serving.records import exposure_record
from slimrec.serving.router import assign_variant
from slimrec.serving.schemas import (
    RecommendRequest,
    RecommendResponse,
    VariantInfo,
    VariantsResponse,
    error_responses,
)
from slimrec.serving.service import Served, Service
from slimrec.serving.settings import MAX_K
from slimrec.serving.shadow import overlap_at_k, rank_biased_overlap
from slimrec.serving.variants import Variant
from starlette.background import BackgroundTask

router = APIRouter()
RECOMMEND_ERRORS = error_responses(400, 403, 404, 413, 422, 503, 504)


@router.get("/healthz")
async def healthz() -> dict:
    """Liveness: the process answers HTTP."""
    return {"status": "ok"}


@router.get("/readyz", responses=error_responses(503))
async def readyz(service: ServiceDep):
    """Readiness: 200 once every variant is loaded and verified; 503 while loading or draining."""
    if not service.ready:
        return JSONResponse({"detail": "not ready"}, status_code=503, headers={"Retry-After": "1"})
    return {"status": "ready", "variants": {n: s.variant.version for n, s in service.variants.items()}}


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}}}},
)
async def metrics(m: MetricsDep, service: ServiceDep) -> Response:
    """Prometheus text exposition."""
    if service.ready:
        service.live.record_stats()
    return Response(m.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/variants", responses=error_responses(503))
async def list_variants(service: ReadyServiceDep) -> VariantsResponse:
    """Loaded variants with their manifest summaries (sizes, metrics, promotable), and the split."""
    infos = [
        VariantInfo(weight=service.split.get(name, 0.0), **served.variant.describe())
        for name, served in service.variants.items()
    ]
    return VariantsResponse(
        variants=infos,
        split=service.split,
        split_version=service.split_version,
        overrides_allowed=service.settings.overrides_allowed,
        shadow_fraction=service.settings.shadow_fraction,
    )


# The two recommendation routes are the hot path. FastAPI documents them from the signatures
# below; their requests are parsed by serving/direct.py (same models, same errors) and answered
# by `serve`, with no per-request dependency solving and no response-model round trip: they
# return ready JSON bytes. The readiness and override checks run as plain calls in `serve`.


async def recommend(body: RecommendRequest) -> RecommendResponse:
    """Top-k items for a user: known users by id; new users by `history` and optional features."""
    raise NotImplementedError("documents the route; requests go to answer_recommend")


async def user_recommendations(
    user_id: Annotated[str, Path(min_length=1, max_length=128)],
    k: Annotated[int, Query(ge=1, le=MAX_K)] = 10,
    exclude_seen: bool = True,
    include_genres: Annotated[list[str], Query()] = [],  # noqa: B006 (FastAPI copies defaults)
    exclude_genres: Annotated[list[str], Query()] = [],  # noqa: B006
) -> RecommendResponse:
    """The same as POST /v1/recommend without a history (unknown users get the fallback)."""
    raise NotImplementedError("documents the route; requests go to answer_user_recommendations")


async def answer_recommend(request: Request) -> Response:
    return await serve(await recommend_body(request), request)


async def answer_user_recommendations(request: Request) -> Response:
    return await serve(await user_query(request), request)


# (method, path, documented endpoint, handler); serving/app.py hands them to DirectDispatch too.
# `{user_id:path}`: the server sees the path percent-decoded, so an id holding "/" ("%2F" on the
# wire) spans segments; the match runs up to the last "/recommendations" (OpenAPI shows {user_id}).
DIRECT_ROUTES: list[tuple[str, str, Callable[..., Any], Handler]] = [
    ("POST", "/v1/recommend", recommend, answer_recommend),
    ("GET", "/v1/users/{user_id:path}/recommendations", user_recommendations, answer_user_recommendations),
]
for method, path, documented, answer in DIRECT_ROUTES:
    router.add_api_route(
        path,
        documented,
        methods=[method],
        response_model=RecommendResponse,
        responses=RECOMMEND_ERRORS,
        openapi_extra=VARIANT_HEADER_DOC,
        route_class_override=direct_route(answer),
    )


async def serve(body: RecommendRequest, request: Request) -> Response:
    """Route, build the query, await the batcher (or a fallback), answer; maybe schedule a shadow."""
    started = time.perf_counter()
    service = ready_service(request.app.state.service)
    forced = check_forced_variant(service, request.headers.get(VARIANT_HEADER))
    if len(body.history) > service.settings.max_history:
        raise HTTPException(
            422,
            f"history: {len(body.history)} items, at most "
            f"{service.settings.max_history} allowed (send the most recent ones)",
        )
    name = forced or assign_variant(body.user_id, service.split, service.settings.salt)
    request.state.variant = name
    try:
        async with asyncio.timeout_at(getattr(request.state, "deadline", None)):
            live = await service.live.history_of(body.user_id)
            served, query, answer = await answer_with_fallback(service, name, body, live)
    except TimeoutError:
        service.metrics.deadline.labels(name).inc()
        raise HTTPException(
            504,
            f"no answer within the {service.settings.request_timeout_ms:.0f} ms "
            "deadline (request_timeout_ms)",
        ) from None
    request_id = _request_id(request)
    # For the request log line and the trace (serving/observability.py): who answered, and when.
    request.state.model_version, request.state.answer = served.variant.version, answer
    request.state.submitted_at = query.submitted_at
    result = to_response(served.variant, body.user_id, answer, query.ignored_history, request_id, name)
    timings = {**answer.timings, "total": time.perf_counter() - started}
    headers = {
        "Server-Timing": ", ".join(f"{s};dur={v * 1000:.3f}" for s, v in timings.items()),
        VARIANT_HEADER: name,
        "X-Request-ID": request_id,
    }
    service.metrics.record_answer(name, answer.timings, answer.fallback)
    service.live.write(
        exposure_record(
            at=body.timestamp,
            request_id=request_id,
            user_id=body.user_id,
            arm=name,
            variant=served.variant.name,
            model_version=served.variant.version,
            split_version=service.split_version,
            fallback=answer.fallback,
            k=body.k,
            items=result["items"],
            latency_ms=timings["total"] * 1000,
        )
    )
    if query.ignored_history:
        service.metrics.ignored_history.labels(name).inc(len(query.ignored_history))
    background = None
    fraction = service.settings.shadow_fraction
    if answer.fallback is None and fraction > 0 and random.random() < fraction:
        partner = service.shadow_partner(name)
        if partner is not None:  # runs after the response is sent
            background = BackgroundTask(
                shadow_compare, service, name, partner, body, [item["item_id"] for item in result["items"]]
            )
    return Response(
        orjson.dumps(result), headers=headers, media_type="application/json", background=background
    )


async def answer_with_fallback(
    service: Service,
    name: str,
    body: RecommendRequest,
    live: Sequence[str] = (),
) -> tuple[Served, ModelQuery, Answer]:
    """The variant's answer; if its model raises, another variant's, else its popularity list.

    Returns:
        (the Served that answered, its query, the answer); `answer.fallback` says which path.

    Raises:
        HTTPException: 422 for a request the variant cannot answer as asked (not a model
            failure, so no fallback), 503 while shutting down.
    """
    served = service.variants[name]
    try:
        return await _answer(service, served, body, live)
    except HTTPException:
        raise
    except Exception as exc:  # the model failed at run time: ORT, FAISS, a bad table row, ...
        service.record_model_error(name, exc)
    for other in service.fallback_order(name):
        try:
            answered, query, answer = await _answer(service, service.variants[other], body, live)
        except HTTPException:
            continue  # e.g. a genre that variant's catalogue lacks
        except Exception as exc:  # that model failing too
            service.record_model_error(other, exc)
            continue
        answer.fallback = f"variant:{other}"
        service.metrics.runtime_fallbacks.labels(name, answer.fallback).inc()
        return answered, query, answer
    query = _query(served, body, live)  # the popularity list needs no model call
    seen = seen_items(served.variant, query)
    items = served.variant.model.popular(body.k, exclude=seen, allowed=query.allowed)
    service.metrics.runtime_fallbacks.labels(name, "popular").inc()
    return served, query, Answer(items, None, "popular", {}, 1)


def _query(served: Served, body: RecommendRequest, live: Sequence[str]) -> ModelQuery:
    try:
        return build_query(
            served.variant,
            body.user_id,
            body.k,
            body.exclude_seen,
            body.history,
            body.features(),
            body.include_genres,
            body.exclude_genres,
            reject_unknown_items=body.unknown_items == "reject",
            live=live,
            request_id=observability.request_id.get(),
        )
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from exc


async def _answer(
    service: Service,
    served: Served,
    body: RecommendRequest,
    live: Sequence[str] = (),
) -> tuple[Served, ModelQuery, Answer]:
    """(the Served that answered, query, answer); model errors propagate. `live`: the user's live
    history (item ids from events, oldest first)."""
    for attempt in range(2):
        query = _query(served, body, live)
        try:
            return served, query, await served.batcher.submit(query)
        except BatcherClosed as exc:
            # A reload swapped this variant between routing and submitting: ask the new one, once.
            current = service.variants.get(served.variant.name)
            if attempt or not service.ready or current is None or current is served:
                raise HTTPException(503, str(exc), headers={"Retry-After": "1"}) from exc
            served = current
    raise AssertionError("unreachable")


def to_response(
    variant: Variant,
    user_id: str,
    answer: Answer,
    ignored_history: list[str],
    request_id: str,
    routed_to: str | None = None,
) -> dict:
    """The RecommendResponse (as its JSON dict): raw ids, titles and scores for the answer's item
    indices (`routed_to`: the A/B variant). Built as plain data: every field is already typed."""
    ids, titles = variant.item_ids, variant.titles
    # orjson writes NaN and infinity as null (JSON has neither), as pydantic would.
    scores = answer.scores.tolist() if answer.scores is not None else [None] * len(answer.items)
    items = [
        {"item_id": ids[i], "score": s, "title": titles[i]}
        for i, s in zip(answer.items.tolist(), scores, strict=True)
    ]
    return {
        "variant": routed_to or variant.name,
        "model_version": variant.version,
        "user_id": user_id,
        "items": items,
        "fallback": answer.fallback,
        "ignored_history": ignored_history,
        "request_id": request_id,
    }


async def shadow_compare(
    service: Service, primary: str, partner: str, body: RecommendRequest, primary_items: list[str]
) -> None:
    """Answer the same request with the partner variant and record top-k agreement."""
    served = service.variants.get(partner)
    outcome = service.metrics.shadow.labels(primary, partner, "compared")
    answer = None
    try:
        if served is not None:
            served, _, answer = await _answer(service, served, body)
    except Exception:  # a shadow must never hurt the primary path; count it and move on
        answer = None
    if answer is None or served is None:
        service.metrics.shadow.labels(primary, partner, "error").inc()
        return
    items = [served.variant.item_ids[i] for i in answer.items.tolist()]
    metrics = service.metrics
    metrics.shadow_overlap.labels(primary, partner).observe(overlap_at_k(primary_items, items, body.k))
    metrics.shadow_rbo.labels(primary, partner).observe(rank_biased_overlap(primary_items, items))
    outcome.inc()


def _request_id(request: Request) -> str:
    """The id InstrumentMiddleware gave the request (the one its log lines carry)."""
    given = observability.request_id.get()
    return given if given is not None else observability.request_id_from(request.scope["headers"])
