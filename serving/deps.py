"""FastAPI dependencies: the service, readiness, variant choice and the admin token check."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request
from slimrec.serving.metrics import Metrics
from slimrec.serving.service import Service

VARIANT_HEADER = "X-Slimrec-Variant"

# Every dependency is `async def` although none awaits: FastAPI runs a plain `def` dependency in
# its thread pool, a thread handoff per dependency per request. With four of them that cost
# more event-loop time than the whole model path (py-spy, locust at saturation on 2 cores).


async def get_service(request: Request) -> Service:
    return request.app.state.service


async def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


ServiceDep = Annotated[Service, Depends(get_service)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def ready_service(service: Service) -> Service:
    """The service, or 503 while variants are loading or the server is draining."""
    if not service.ready:
        raise HTTPException(
            503,
            "not ready: variants are loading or the server is shutting down",
            headers={"Retry-After": "1"},
        )
    return service


async def _ready_service(service: ServiceDep) -> Service:
    return ready_service(service)


ReadyServiceDep = Annotated[Service, Depends(_ready_service)]


def check_forced_variant(service: Service, name: str | None) -> str | None:
    """The variant named by X-Slimrec-Variant (`name`), if overrides are allowed and it is loaded.

    Raises:
        HTTPException: 403 when overrides are disabled, 400 for a variant that is not loaded.
    """
    if name is None:
        return None
    if not service.settings.overrides_allowed:
        raise HTTPException(
            403,
            f"{VARIANT_HEADER} is disabled on this server (enable with SLIMREC_ALLOW_VARIANT_OVERRIDE=true)",
        )
    if name not in service.variants:
        raise HTTPException(
            400, f"{VARIANT_HEADER}: unknown variant {name!r}; loaded: {', '.join(sorted(service.variants))}"
        )
    return name


# The recommendation routes read the header themselves (no per-request dependency); this
# documents it in their OpenAPI operation.
VARIANT_HEADER_DOC = {
    "parameters": [
        {
            "name": VARIANT_HEADER,
            "in": "header",
            "required": False,
            "schema": {"type": "string"},
            "description": "serve this variant instead of the A/B choice (when overrides are allowed)",
        }
    ]
}


async def require_admin(service: ServiceDep, authorization: Annotated[str | None, Header()] = None) -> None:
    """Admin endpoints: `Authorization: Bearer <SLIMREC_ADMIN_TOKEN>`; disabled without a token.

    Raises:
        HTTPException: 403 when no admin token is configured, 401 for a missing or wrong token.
    """
    token = service.settings.admin_token
    if token is None:
        raise HTTPException(403, "admin API disabled: no admin token configured (set SLIMREC_ADMIN_TOKEN)")
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest on bytes: constant time in the token's content, and no error on non-ASCII input.
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), token.get_secret_value().encode()
    ):
        raise HTTPException(
            401,
            "missing or wrong admin token (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Depends(require_admin)
