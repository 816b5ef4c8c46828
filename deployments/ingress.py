"""The HTTP ingress: validation, sticky weighted routing between live versions, and the policy stage.

Live versions, their traffic weights and the policy are the deployment's `user_config`; Serve applies a new one
through `reconfigure` on the running replicas, so operators change them without a restart.
"""

import asyncio
import time
import zlib
from datetime import timezone
from typing import Any, Mapping

import numpy as np
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.schemas import (EventsRequest, EventsResponse, LiveVersion, RecommendedItem, RecommendRequest,
                                 RecommendResponse, VersionsResponse)
from training.policy import PolicyConfig, RankedList, UserState, apply_policy

app = FastAPI(title="recsys", description="Multi-stage recommendations: retrieval, ranking, policy.")
RANKED_PER_K = 4  # the policy sees 4k ranked items (at least 100), room to sort bought items down and diversify


def version_app_name(version: str) -> str:
    return f"recsys-{version}"


def parse_weights(versions: Mapping[str, Any]) -> dict[str, float]:
    """{"v1": 90, "v2": 10} -> weights; negative, non-numeric or all-zero weights raise ValueError."""
    if not versions:
        raise ValueError("versions: at least one live version is required")
    weights = {}
    for name, w in versions.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"versions.{name}: weight must be a number >= 0, got {w!r}")
        weights[str(name)] = float(w)
    if sum(weights.values()) <= 0:
        raise ValueError("versions: weights sum to 0; at least one version must take traffic")
    return weights


def choose_version(user_id: str, weights: Mapping[str, float]) -> str:
    """Sticky weighted split: a user's crc32 bucket in [0, 1) falls into one version's share of the weights."""
    bucket = zlib.crc32(user_id.encode()) / 2**32
    total = sum(weights.values())
    cumulative = 0.0
    for version, w in weights.items():
        cumulative += w / total
        if bucket < cumulative:
            return version
    return next(v for v, w in reversed(weights.items()) if w > 0)


def _unprocessable(field: list[str], msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["body", *field], "msg": msg, "type": "value_error"}])


@serve.deployment(ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
@serve.ingress(app)
class Ingress:
    def __init__(self, feature_store: DeploymentHandle) -> None:
        self.feature_store = feature_store
        self.weights: dict[str, float] = {}
        self.pipelines: dict[str, DeploymentHandle] = {}
        self.policy = PolicyConfig()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """{"versions": {"v1": 90, "v2": 10}, "policy": {...}}; a bad config raises and the old one stays."""
        unknown = set(user_config) - {"versions", "policy"}
        if unknown:
            raise ValueError(f"ingress user_config: unknown keys {sorted(unknown)}; expected 'versions', 'policy'")
        weights = parse_weights(user_config.get("versions", {}))
        policy = PolicyConfig.from_dict(user_config.get("policy"))
        pipelines = {v: serve.get_app_handle(version_app_name(v)) for v in weights}  # [1] one app per version
        self.weights, self.policy, self.pipelines = weights, policy, pipelines

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest) -> RecommendResponse:
        t0 = time.perf_counter()
        if req.version is not None and req.version not in self.pipelines:
            raise HTTPException(404, f"version {req.version!r} is not live; live versions: {sorted(self.pipelines)}")
        try:
            policy = self.policy.with_overrides(req.policy)
        except ValueError as e:
            raise _unprocessable(["policy"], str(e)) from e
        version = req.version or choose_version(req.user_id, self.weights)
        t_features = time.perf_counter()
        state = await self.feature_store.get.remote(req.user_id)
        features_ms = (time.perf_counter() - t_features) * 1000.0
        try:
            out = await self.pipelines[version].recommend.remote(
                state, req.context.model_dump(), max(RANKED_PER_K * req.k, 100))
        except Exception as e:  # a failing stage answers with a clear error, never a hang or a crash
            raise HTTPException(503, f"version {version} could not answer: {type(e).__name__}: {e}") from e
        t_policy = time.perf_counter()
        ranked = RankedList(out["item_ids"], np.asarray(out["scores"], np.float32), out["brands"], out["categories"],
                            out["reasons"])
        final = apply_policy(ranked, UserState(state["bought_at"], time.time()), policy)
        policy_ms = (time.perf_counter() - t_policy) * 1000.0
        items = [RecommendedItem(item_id=final.item_ids[i], score=float(final.scores[i]), brand=final.brands[i],
                                 category=final.categories[i], reason=final.reasons[i])
                 for i in range(min(req.k, len(final)))]
        timings = {"features": features_ms, **out["timings_ms"], "policy": policy_ms,
                   "total": (time.perf_counter() - t0) * 1000.0}
        return RecommendResponse(user_id=req.user_id, version=version, cold_start=out["cold_start"], items=items,
                                 timings_ms={k: round(v, 3) for k, v in timings.items()})

    @app.post("/events", response_model=EventsResponse)
    async def events(self, req: EventsRequest) -> EventsResponse:
        now = time.time()
        rows = [{"user_id": e.user_id, "item_id": e.item_id, "action": e.action,
                 "ts": (e.timestamp.replace(tzinfo=e.timestamp.tzinfo or timezone.utc).timestamp()
                        if e.timestamp else now)} for e in req.events]
        return EventsResponse(accepted=await self.feature_store.append.remote(rows))

    @app.get("/versions", response_model=VersionsResponse)
    async def versions(self) -> VersionsResponse:
        infos = await asyncio.gather(*[self.pipelines[v].info.remote() for v in self.weights])
        return VersionsResponse(versions=[LiveVersion(version=v, weight=self.weights[v], bundle=i["bundle"],
                                                      index=i["index"]) for v, i in zip(self.weights, infos)])

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        results = await asyncio.gather(*[self.pipelines[v].health.remote() for v in self.weights],
                                       self.feature_store.stats.remote(), return_exceptions=True)
        failed = {name: f"{type(r).__name__}: {r}" for name, r in zip([*self.weights, "feature_store"], results)
                  if isinstance(r, BaseException)}
        body = {"status": "ok" if not failed else "unavailable", "failed": failed,
                "versions": {v: self.weights[v] for v in self.weights}}
        return JSONResponse(body, status_code=200 if not failed else 503)
