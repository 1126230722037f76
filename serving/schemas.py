"""Request and response models of the HTTP API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from slimrec.serving.settings import MAX_K

RawId = Annotated[str, Field(min_length=1, max_length=128)]
Genre = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    # extra="forbid": a typo ("exclude_seem") is an error, not ignored. strict: JSON types as
    # declared, no coercion ("k": true or "k": "10" is a 422, not k=1 or k=10).
    model_config = ConfigDict(extra="forbid", strict=True)


class RecommendRequest(_Strict):
    """POST /v1/recommend. Ids are raw ids as strings; `history` is oldest first, most recent last."""

    user_id: RawId
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    history: list[RawId] = Field(
        default_factory=list, description="item ids; appended to a known user's stored history"
    )
    unknown_items: Literal["ignore", "reject"] = Field(
        "ignore", description="history ids the model does not know: drop and report, or 422"
    )
    age: int | None = Field(None, ge=0, le=150)
    gender: str | None = Field(None, max_length=32)
    occupation: str | None = Field(None, max_length=64)
    zip_code: str | None = Field(None, max_length=16)
    include_genres: list[Genre] = Field(default_factory=list, max_length=64)
    exclude_genres: list[Genre] = Field(default_factory=list, max_length=64)
    timestamp: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="the request's own clock (Unix seconds) for the exposure log, e.g. a replay's "
        "time; default: the server's clock",
    )

    def features(self) -> dict:
        return {
            "age": self.age,
            "gender": self.gender,
            "occupation": self.occupation,
            "zip_code": self.zip_code,
        }


class ScoredItem(BaseModel):
    item_id: str
    score: float | None = Field(description="final ranker score; null for the popularity fallback")
    title: str


class RecommendResponse(BaseModel):
    variant: str = Field(description="the A/B variant the request was routed to")
    model_version: str = Field(description="version of the artifact that produced `items`")
    user_id: str
    items: list[ScoredItem]
    fallback: str | None = Field(
        None,
        pattern=r"^(popular|variant:.+)$",
        description='null: the variant\'s model answered. "popular": the popularity list (unknown user '
        'without usable history, or the variant\'s model failed). "variant:NAME": the '
        "variant's model failed and variant NAME answered instead",
    )
    ignored_history: list[str] = Field(
        default_factory=list, description="history ids unknown to this model, not used"
    )
    request_id: str


class ReplicaInfo(BaseModel):
    """One model replica of a variant (`--engine ray`): what it serves and holds right now."""

    replica: str
    pid: int
    node: str
    model_version: str | None = Field(description="the version it answers with by default")
    versions: list[str] = Field(description="versions it holds: during a roll, the old and the new")
    loading: str | None = Field(description="the version (or path) it is loading, if any")
    running: int = Field(description="batches running on it")


class VariantInfo(BaseModel):
    name: str
    path: str
    model_version: str
    weight: float
    loaded_at: float
    n_users: int
    n_items: int
    genres: list[str]
    n_candidates: int = Field(description="candidates the ranker ranks per request (at least its k)")
    n_candidates_from: Literal["artifact", "default", "settings"] = Field(
        description="artifact: the budget `slimrec compress` chose on validation; default: 200, the "
        "artifact names none; settings: the server's n_candidates, which overrides the artifact's"
    )
    summary: dict = Field(description="manifest summary: sizes, metrics, promotable, created_at")
    replicas: list[ReplicaInfo] | None = Field(
        None, description="its model replicas (`--engine ray`); null when it runs in this process"
    )


class VariantsResponse(BaseModel):
    variants: list[VariantInfo]
    split: dict[str, float]
    split_version: int
    overrides_allowed: bool
    shadow_fraction: float


class ReloadRequest(_Strict):
    path: str = Field(min_length=1, max_length=4096, description="artifact dir, under an artifacts root")
    force: bool = Field(False, description="load even if the manifest says promotable: false")


class ReloadResponse(BaseModel):
    variant: str
    model_version: str
    previous_version: str
    path: str


class SplitRequest(_Strict):
    weights: dict[str, float]


class SplitResponse(BaseModel):
    split: dict[str, float]
    version: int = Field(description="the split's version; every exposure logged under it carries it")


class Event(_Strict):
    """One interaction: it enters the user's live history (if its type does) and the event log."""

    event_id: RawId = Field(description="a retry with the same id is applied once")
    user_id: RawId
    item_id: RawId
    timestamp: float = Field(ge=0, allow_inf_nan=False, description="when it happened, Unix seconds")
    type: str = Field(min_length=1, max_length=32, description='e.g. "click", "watch", "rating"')
    request_id: str | None = Field(
        None, min_length=1, max_length=64, description="the recommendation that led to it, if any"
    )


class EventsRequest(_Strict):
    events: list[Event] = Field(min_length=1, description="at most max_events_per_request (default 1000)")


class EventsResponse(BaseModel):
    received: int
    applied: int = Field(description="appended to live histories")
    duplicates: int = Field(description="event ids seen before: retries, applied once")
    unknown_items: int = Field(description="item ids no loaded variant knows: logged, not in histories")
    not_in_history: int = Field(description="types that do not enter histories, or live histories off")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer: one readable line, plus the field errors of a 422 from validation."""

    detail: str
    errors: list[dict] | None = Field(None, description="422 from request validation: loc, msg, type")


_ERRORS = {
    400: "malformed JSON, or X-Slimrec-Variant names a variant that is not loaded",
    401: "missing or wrong admin token",
    403: "X-Slimrec-Variant not allowed on this server; admin API disabled; reload path outside the roots",
    404: "unknown variant (admin), or no such route (a user id containing '/': use POST /v1/recommend)",
    409: "artifact manifest says promotable: false (send force)",
    413: "request body larger than max_body_bytes",
    422: "invalid request (the detail names the field), or body JSON nested too deeply",
    503: "not ready (loading or shutting down), or overloaded: retry after Retry-After seconds",
    504: "request_timeout_ms passed before the model answered",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"schema": {"type": "string"}, "required": True}},
    503: {
        "Retry-After": {
            "schema": {"type": "string"},
            "required": True,
            "description": "seconds to wait before retrying",
        }
    },
}


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI `responses=` entries for the error statuses an endpoint can answer."""
    return {
        code: {
            "model": ErrorResponse,
            "description": _ERRORS[code],
            **({"headers": _HEADERS[code]} if code in _HEADERS else {}),
        }
        for code in codes
    }
