"""The recommendation routes' own request parsing: FastAPI documents them, these parse them.

FastAPI's generic handler (signature-driven parameter solving, `json.loads` then validation,
content-type sniffing with `email.message`) cost the event loop more per request than the
whole model path of the compressed variant. `direct_route(handle)` is an `APIRoute` whose
OpenAPI entry comes from the endpoint's signature as usual, while requests go to
`handle(request)`, which parses with the same pydantic models (`model_validate_json`: JSON
parsed and validated in one pass in pydantic-core) and raises the same errors, so the
app's handlers answer them exactly as before: 400 for malformed JSON, 422 naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from slimrec.serving.schemas import RawId, RecommendRequest
from slimrec.serving.settings import MAX_K
from starlette.routing import compile_path

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def direct_route(handle: Handler) -> type[APIRoute]:
    """An APIRoute class whose requests are answered by `handle(request)` (see the module docstring)."""

    class DirectRoute(APIRoute):
        def get_route_handler(self) -> Handler:
            return handle

    return DirectRoute


async def recommend_body(request: Request) -> RecommendRequest:
    """The POST body as a RecommendRequest, or the error FastAPI would raise for it.

    Raises:
        RequestValidationError: missing body, non-JSON content type, invalid fields (loc
            starts with "body", as FastAPI's).
        HTTPException: 400 for malformed JSON.
    """
    raw = await request.body()
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    if not _is_json(request.headers.get("content-type")):
        raise RequestValidationError(
            [
                {
                    "type": "model_attributes_type",
                    "loc": ("body",),
                    "msg": "Input should be a valid dictionary or object to extract fields from",
                }
            ]
        )
    try:
        return RecommendRequest.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        malformed = next((e for e in errors if e["type"] == "json_invalid"), None)
        if malformed is not None:
            raise HTTPException(400, f"malformed JSON body: {malformed['msg']}") from None
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from None


class _UserQuery(BaseModel):
    """GET /v1/users/{user_id}/recommendations: path and query, parsed leniently as FastAPI does
    (k=10 and exclude_seen=false arrive as strings); unknown query parameters are ignored."""

    model_config = ConfigDict(extra="ignore")
    user_id: RawId
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 10
    exclude_seen: bool = True
    include_genres: list[str] = Field(default_factory=list)
    exclude_genres: list[str] = Field(default_factory=list)


async def user_query(request: Request) -> RecommendRequest:
    """The path and query as a RecommendRequest, or the error FastAPI would raise for them.

    Raises:
        RequestValidationError: loc starts with "path" (user_id) or "query" (the rest).
    """
    params = request.query_params
    given = {
        "user_id": request.path_params["user_id"],
        "k": params.get("k"),
        "exclude_seen": params.get("exclude_seen"),
        "include_genres": params.getlist("include_genres"),
        "exclude_genres": params.getlist("exclude_genres"),
    }
    try:
        parsed = _UserQuery.model_validate({k: v for k, v in given.items() if v is not None})
        return RecommendRequest(**parsed.model_dump())
    except ValidationError as exc:  # e.g. ?k=500, or ?include_genres= (an empty genre name)
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            [{**e, "loc": ("path" if e["loc"][:1] == ("user_id",) else "query", *e["loc"])} for e in errors]
        ) from None


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: no content type, application/json or application/*+json."""
    if not content_type:
        return True
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


class DirectDispatch:
    """Innermost middleware: requests for the `routes` go straight to their handlers.

    Below this point FastAPI would add an exception middleware, an exit stack, two levels of
    router matching and its per-route request wrapper before reaching the same handler (half
    the event loop's time per request at saturation). The routes stay registered with
    FastAPI (`direct_route`) for the OpenAPI document and for what this does not take (paths
    under a root_path prefix); errors are answered by the app's own exception handlers, so
    both paths answer alike.

    Args:
        app: the ASGI app below (FastAPI's exception middleware and router).
        routes: (method, path template as Starlette writes it, documented endpoint, handler).
    """

    def __init__(self, app, routes: list[tuple[str, str, Callable, Handler]]):
        self.app = app
        # DOTALL: a `{user_id:path}` match is ".*", and a user id may hold a line break ("%0A").
        self.routes = [
            (method, re.compile(compile_path(path)[0].pattern, re.DOTALL), handler)
            for method, path, _, handler in routes
        ]

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            for method, pattern, handler in self.routes:
                match = pattern.match(scope["path"])
                if match and scope["method"] == method:
                    scope["path_params"] = match.groupdict()
                    return await self._answer(handler, scope, receive, send)
        await self.app(scope, receive, send)

    @staticmethod
    async def _answer(handler: Handler, scope, receive, send) -> None:
        request = Request(scope, receive)
        try:
            response = await handler(request)
        except Exception as exc:
            answer = _exception_handler(scope["app"].exception_handlers, exc)
            if answer is None:
                raise  # uvicorn answers 500, as for any route
            response = await answer(request, exc)
        await response(scope, receive, send)


def _exception_handler(handlers: dict, exc: Exception):
    """The app's handler for `exc`, looked up along its class hierarchy as Starlette does."""
    for cls in type(exc).__mro__:
        if cls in handlers:
            return handlers[cls]
    return None
