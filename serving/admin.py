"""Admin endpoints (bearer token): hot-reload a variant's artifact, change the A/B split.

With `--workers N` a split change reaches every worker through the stored split (they re-read
it every state_refresh_s); a reload reaches the one worker that received it.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from slimrec.serving.deps import AdminDep, ReadyServiceDep
from slimrec.serving.schemas import (
    ReloadRequest,
    ReloadResponse,
    SplitRequest,
    SplitResponse,
    error_responses,
)
from slimrec.serving.service import ReloadError
from slimrec.serving.state import StateUnavailable

router = APIRouter(prefix="/admin", dependencies=[AdminDep])


@router.post("/variants/{name}/reload", responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503))
async def reload_variant(name: str, body: ReloadRequest, service: ReadyServiceDep) -> ReloadResponse:
    """Load + verify + smoke-test the artifact at `path` beside the running one, then swap.

    On any failure the running variant keeps serving and the 4xx response says why.
    """
    try:
        new, previous = await service.reload(name, body.path, force=body.force)
    except ReloadError as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    return ReloadResponse(
        variant=name, model_version=new.version, previous_version=previous.version, path=str(new.path)
    )


@router.put("/split", responses=error_responses(400, 401, 403, 413, 422, 503))
async def put_split(body: SplitRequest, service: ReadyServiceDep) -> SplitResponse:
    """Replace the A/B weights (variants left out get 0) as the next stored version; users move only
    across changed ranges. The stored split survives restarts (it wins over the configured one)."""
    try:
        record = await service.set_split(body.weights)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    except StateUnavailable as exc:
        service.metrics.state_errors.labels("write_split").inc()
        raise HTTPException(
            503, f"split not changed: state store unreachable ({exc})", headers={"Retry-After": "1"}
        ) from exc
    return SplitResponse(split=record.weights, version=record.version)
