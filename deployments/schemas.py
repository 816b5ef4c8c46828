"""The HTTP contract: pydantic request and response models (OpenAPI comes from FastAPI)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from training.data.schemas import ACTIONS
from training.request.contracts import ItemFilter

Action = Literal[ACTIONS]  # type: ignore[valid-type]
Id = Field(min_length=1, max_length=128, pattern=r"^[^\s]+$")


class RequestContext(BaseModel):
    model_config = ConfigDict(extra="forbid")
    country: str | None = Field(None, max_length=8)
    device: str | None = Field(None, max_length=32)
    page: str | None = Field("home", max_length=32)
    category: str | None = Field(None, max_length=128)
    query: str | None = Field(None, max_length=256)


Name = Field(min_length=1, max_length=128)
MAX_FILTER_VALUES = 100  # a filter names at most this many brands or categories


class RecommendFilters(BaseModel):
    """Which items the request may get; applied inside the index search, so k matching items still come back."""
    model_config = ConfigDict(extra="forbid")
    categories: list[Annotated[str, Name]] = Field(default_factory=list, max_length=MAX_FILTER_VALUES)
    brands: list[Annotated[str, Name]] = Field(default_factory=list, max_length=MAX_FILTER_VALUES)
    exclude_brands: list[Annotated[str, Name]] = Field(default_factory=list, max_length=MAX_FILTER_VALUES)
    in_stock: bool | None = None
    price_min: float | None = Field(None, ge=0, allow_inf_nan=False)
    price_max: float | None = Field(None, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _price_range(self) -> "RecommendFilters":
        if self.price_min is not None and self.price_max is not None and self.price_min > self.price_max:
            raise ValueError(f"price_min {self.price_min} is above price_max {self.price_max}")
        return self

    def to_filter(self) -> ItemFilter:
        return ItemFilter(tuple(self.categories), tuple(self.brands), tuple(self.exclude_brands), self.in_stock,
                          self.price_min, self.price_max)


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Id
    k: int = Field(20, ge=1, le=500)
    context: RequestContext = Field(default_factory=RequestContext)
    # Overrides of the deployment's PolicyConfig for this request: clients may set a few (deployments.ingress.access),
    # the rest need the admin token. Values are checked by PolicyConfig (bounded lists and strings).
    policy: dict[Annotated[str, Field(max_length=64)], Any] | None = Field(None, max_length=32)
    version: str | None = Field(None, max_length=40)  # force a live version instead of the weighted split
    request_id: str | None = Field(None, min_length=1, max_length=128)  # seeds exploration; the same id, the same draw
    filters: RecommendFilters = Field(default_factory=RecommendFilters)


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    brand: str
    category: str
    reason: str


class RecommendResponse(BaseModel):
    user_id: str
    request_id: str | None = None  # send it back to reproduce this answer's exploration
    version: str
    cold_start: bool
    partial: bool = False  # an index shard did not answer in time: the items come from the other shards
    store_fallback: bool = False  # the online store did not answer: context and popular items only
    items: list[RecommendedItem]
    timings_ms: dict[str, float]


class EventIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: str = Id
    item_id: str = Id
    action: Action
    timestamp: datetime | None = None  # server time when absent
    position: int | None = Field(None, ge=0, le=10_000)  # the 0-based slot the item was shown at
    context: RequestContext | None = None


class EventsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[EventIn] = Field(min_length=1, max_length=10_000)


class EventsResponse(BaseModel):
    accepted: int
    durable: bool  # stored where a restart keeps it (Redis); false for the embedded store


class LiveVersion(BaseModel):
    version: str
    weight: float
    bundle: str
    index: dict[str, Any]


class VersionsResponse(BaseModel):
    versions: list[LiveVersion]


class PolicyUpdateRequest(BaseModel):
    """POST /admin/policy: a whole new policy config (PolicyConfig fields; omitted fields take their defaults)."""
    model_config = ConfigDict(extra="forbid")
    policy: dict[str, Any]


class PolicyStateResponse(BaseModel):
    version: int  # the registry's config version, +1 per change
    policy: dict[str, Any]
    applied_replicas: int = 0  # ingress replicas that confirmed this version before the answer
    pending_replicas: list[str] = Field(default_factory=list)  # live replicas that had not confirmed it in time
