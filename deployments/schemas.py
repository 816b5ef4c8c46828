"""The HTTP contract: pydantic request and response models (OpenAPI comes from FastAPI)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.data.changes import ItemChange
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
    # the version of each part that made this answer (retrieval's tower, the index, the ranker): always `version`
    stage_versions: dict[str, str] = Field(default_factory=dict)
    # when the answer was made, on the serving clock (training/request/clock.py): events about it are stamped
    # after this instant, on the same time line, so they join the impression log point in time
    served_at: datetime | None = None


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
    # which order the version serves ("ranker" or "retrieval") and why: its evaluation's NDCG@10 of both orders
    order: dict[str, Any] | None = None


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


VersionName = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="a version name")


class RolloutStartRequest(BaseModel):
    """POST /admin/rollout/start: deploy `version` from `bundle` (a path every node reads) beside the live ones."""
    model_config = ConfigDict(extra="forbid")
    version: str = VersionName
    bundle: str = Field(min_length=1, max_length=4096)


class RolloutShiftRequest(BaseModel):
    """POST /admin/rollout/shift: move traffic to `version` in steps (percent), `every_s` apart (0: at once)."""
    model_config = ConfigDict(extra="forbid")
    version: str = VersionName
    to: list[float] = Field(min_length=1, max_length=20)
    every_s: float = Field(60.0, ge=0, le=86_400)

    @field_validator("to")
    @classmethod
    def _steps(cls, to: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in to) or any(b <= a for a, b in zip(to, to[1:])):
            raise ValueError("steps are increasing percentages in (0, 100], e.g. [10, 50, 100]")
        return to


class RolloutVersionRequest(BaseModel):
    """POST /admin/rollout/retire: the version to remove."""
    model_config = ConfigDict(extra="forbid")
    version: str = VersionName


class ShadowRequest(BaseModel):
    """POST /admin/rollout/shadow: a share of live requests is also answered by `version` (answers not returned);
    share 0 stops it."""
    model_config = ConfigDict(extra="forbid")
    version: str = VersionName
    share: float = Field(ge=0, le=1)


MAX_ITEM_CHANGES = 1000  # changes in one POST /admin/items (a bigger batch: `recsys items apply FILE.parquet`)


class ItemChangeModel(BaseModel):
    """One catalog change (`training.data.changes.ItemChange`): `upsert` creates or replaces an item (brand, category
    and price required), `update` changes some attributes of an item the catalog has, `delete` removes it."""
    model_config = ConfigDict(extra="forbid")
    op: Literal["upsert", "update", "delete"]
    item_id: str = Id
    brand: str | None = Field(None, min_length=1, max_length=128)
    category: str | None = Field(None, min_length=1, max_length=128)
    price: float | None = Field(None, ge=0, allow_inf_nan=False)
    in_stock: bool | None = None
    created_at: float | None = Field(None, ge=0, allow_inf_nan=False, description="unix seconds; default: now")

    @model_validator(mode="after")
    def _consistent(self) -> "ItemChangeModel":
        self.to_change()  # the op's own rules (what an upsert needs, what a delete may not carry)
        return self

    def to_change(self) -> ItemChange:
        return ItemChange(**self.model_dump(exclude_none=True))


class ItemsRequest(BaseModel):
    """POST /admin/items: catalog changes, applied in this order by every live version without a rebuild."""
    model_config = ConfigDict(extra="forbid")
    changes: list[ItemChangeModel] = Field(min_length=1, max_length=MAX_ITEM_CHANGES)


class ItemsResponse(BaseModel):
    offset: int  # the log offset of the last change: /healthz shows each replica's offset applied
    accepted: int
    logs: int  # change logs written (one per distinct log among the live versions; usually one)
