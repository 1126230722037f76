"""Request and response models of the HTTP API (pydantic; unknown fields are refused)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.settings import MAX_K

RawId = Annotated[str, Field(min_length=1, max_length=128)]
Genre = Annotated[str, Field(min_length=1, max_length=64)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a typo ("exclude_seem") is an error, not ignored


class RecommendRequest(_Strict):
    """POST /v1/recommend. Ids are raw ids as strings; `history` is oldest first, most recent last."""

    user_id: RawId
    k: int = Field(10, ge=1, le=MAX_K)
    exclude_seen: bool = True
    history: list[RawId] = Field(default_factory=list,
                                 description="item ids; appended to a known user's stored history")
    unknown_items: Literal["ignore", "reject"] = Field(
        "ignore", description="history ids the model does not know: drop and report, or 422")
    age: int | None = Field(None, ge=0, le=150)
    gender: str | None = Field(None, max_length=32)
    occupation: str | None = Field(None, max_length=64)
    zip_code: str | None = Field(None, max_length=16)
    include_genres: list[Genre] = Field(default_factory=list, max_length=64)
    exclude_genres: list[Genre] = Field(default_factory=list, max_length=64)

    def features(self) -> dict:
        return {"age": self.age, "gender": self.gender, "occupation": self.occupation,
                "zip_code": self.zip_code}


class ScoredItem(BaseModel):
    item_id: str
    score: float | None = Field(description="final ranker score; null for the popularity fallback")
    title: str


class RecommendResponse(BaseModel):
    variant: str
    model_version: str
    user_id: str
    items: list[ScoredItem]
    fallback: Literal["popular"] | None = None
    ignored_history: list[str] = Field(default_factory=list,
                                       description="history ids unknown to this model, not used")
    request_id: str


class VariantInfo(BaseModel):
    name: str
    path: str
    model_version: str
    weight: float
    loaded_at: float
    n_users: int
    n_items: int
    genres: list[str]
    summary: dict = Field(description="manifest summary: sizes, metrics, promotable, created_at")


class VariantsResponse(BaseModel):
    variants: list[VariantInfo]
    split: dict[str, float]
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
