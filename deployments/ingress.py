"""The HTTP ingress: validation, sticky weighted routing between live versions, the policy stage, its steering and
its online metrics.

Steering the policy. Live versions, weights and the base policy are the deployment's `user_config`; Serve applies a
new one through `reconfigure` on the running replicas (`serve deploy` with a changed `user_config` is a lightweight
update). The admin endpoint `POST /admin/policy` must reach every ingress replica, not only the one that received
it, and a replica cannot call `serve.run` on its own application: an imperative `serve.run` gives the deployment a
new random code version, so Serve replaces (restarts) every replica, including the one waiting for the call to
return. Hence one small named actor, `PolicyRegistry` (`recsys-policy-registry`), holds the current policy and a
version number, and every replica follows it with a long poll (`wait_newer`), which also acknowledges the version it
runs. The admin endpoint validates the config (a bad one gets a 422 naming the field and nothing changes), stores
it, and answers once every live replica has acknowledged it, so the next request on any replica uses it. Requests
in flight keep the (immutable) config they started with: no request fails and no replica restarts. New replicas
read the registry in `reconfigure`, before they take traffic. Precedence: the latest change wins, whether it came
from the admin endpoint or from a `user_config` whose policy differs from the one deployed before.

Online metrics (Ray Serve custom metrics, exported by Ray in Prometheus format on each node's metrics export port,
with Serve's deployment/replica/application tags added): per served model version and surface (page), the number
of answers, histograms of unique brands, longest same-brand run and share of new items in the answered items, and
a counter of answered items per policy rule that placed or moved them.
"""

import asyncio
import hashlib
import hmac
import logging
import os
import time
import uuid
import zlib
from datetime import timezone
from typing import Any, Mapping

import numpy as np
import ray
from fastapi import FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import metrics
from ray.serve.handle import DeploymentHandle

from deployments.schemas import (EventsRequest, EventsResponse, LiveVersion, PolicyStateResponse, PolicyUpdateRequest,
                                 RecommendedItem, RecommendRequest, RecommendResponse, VersionsResponse)
from training.policy import (PolicyConfig, RankedList, UserState, apply_policy, is_new_item, longest_brand_run,
                             request_rng)

logger = logging.getLogger("ray.serve")
app = FastAPI(title="recsys", description="Multi-stage recommendations: retrieval, ranking, policy.")
RANKED_PER_K = 4  # the policy sees 4k ranked items (at least 100), room to sort bought items down and diversify
MIN_RANKED = 100
REGISTRY_NAME, NAMESPACE = "recsys-policy-registry", "recsys"
ADMIN_TOKEN_ENV = "RECSYS_ADMIN_TOKEN"  # the admin token itself, in the replicas' environment
POLL_S = 20.0  # a follower re-polls at least this often, which is also its liveness heartbeat
LIVE_S = 2 * POLL_S + 5.0  # a replica silent for longer is presumed gone and not waited for
ACK_TIMEOUT_S = 10.0  # how long the admin endpoint waits for every replica to confirm


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




class PolicyRegistry:
    """The current policy config (a validated dict) and its version, followed by every ingress replica; run as the
    named actor `recsys-policy-registry`. Plain asyncio, so it is unit-tested without Ray."""

    def __init__(self) -> None:
        self.version, self.policy, self.base = 0, PolicyConfig().to_dict(), None
        self.seen: dict[str, tuple[int, float]] = {}  # replica -> (version it runs, monotonic time last heard)
        self._changed = asyncio.Event()

    def _bump(self, policy: dict[str, Any]) -> int:
        self.version, self.policy = self.version + 1, policy
        self._changed.set()  # wakes every waiting follower; the next wait gets a fresh event
        self._changed = asyncio.Event()
        return self.version

    async def publish_base(self, policy: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A replica's `user_config` policy: it becomes current only when it differs from the last one published,
        so the N replicas of one deployment (and later autoscaled ones) do not undo an admin change."""
        if policy != self.base:
            self.base = policy
            self._bump(policy)
        return self.version, self.policy

    async def set(self, policy: dict[str, Any]) -> int:
        """Stores a validated policy (the admin endpoint); returns its version."""
        return self._bump(policy)

    async def current(self) -> tuple[int, dict[str, Any]]:
        return self.version, self.policy

    async def wait_newer(self, replica: str, version: int, timeout_s: float = POLL_S) -> tuple[int, dict[str, Any]]:
        """Records that ``replica`` runs ``version``; returns as soon as a newer one exists (or after timeout_s)."""
        self.seen[replica] = (version, time.monotonic())
        if self.version <= version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.version, self.policy

    async def leave(self, replica: str) -> None:
        """A replica shutting down (a roll, a downscale) is no longer waited for."""
        self.seen.pop(replica, None)

    async def pending(self, version: int) -> list[str]:
        """Live replicas (heard from within LIVE_S) that do not yet run ``version``."""
        now = time.monotonic()
        return sorted(r for r, (v, t) in self.seen.items() if now - t <= LIVE_S and v < version)

    async def applied(self, version: int) -> int:
        now = time.monotonic()
        return sum(1 for v, t in self.seen.values() if now - t <= LIVE_S and v >= version)


def check_admin_token(authorization: str | None, expected_sha256: str | None) -> None:
    """401 without a bearer token, 403 with a wrong one or when no token is configured; compares digests in
    constant time."""
    if not authorization or not authorization.startswith("Bearer ") or not authorization[7:].strip():
        raise HTTPException(401, "admin: send 'Authorization: Bearer <token>'", headers={"WWW-Authenticate": "Bearer"})
    if not expected_sha256:
        raise HTTPException(403, f"admin: disabled; set {ADMIN_TOKEN_ENV} for the ingress replicas or "
                                 "'admin_token_sha256' in its user_config")
    given = hashlib.sha256(authorization[7:].strip().encode()).hexdigest()
    if not hmac.compare_digest(given, expected_sha256):
        raise HTTPException(403, "admin: token refused")


def parse_policy(policy: Mapping[str, Any] | None, where: list[str]) -> PolicyConfig:
    """A PolicyConfig from a request's mapping; a bad one is a 422 whose message names the field."""
    try:
        return PolicyConfig.from_dict(policy)
    except (ValueError, TypeError) as e:
        raise _unprocessable(where, str(e)) from e


def ranked_from_pipeline(out: Mapping[str, Any]) -> RankedList:
    """The pipeline's answer as a RankedList; `created_at` and `in_stock` are optional (absent: nothing is new,
    everything is in stock)."""
    created, stock = out.get("created_at"), out.get("in_stock")
    return RankedList(out["item_ids"], np.asarray(out["scores"], np.float32), out["brands"], out["categories"],
                      out["reasons"], created_at=None if created is None else np.asarray(created, np.float64),
                      in_stock=None if stock is None else np.asarray(stock, bool))


def answer_figures(final: RankedList, k: int, now: float, new_item_days: float) -> dict[str, Any]:
    """Diversity and novelty of the k answered items: unique brands, longest brand run, share of new items, and
    the count of items per policy rule (the "policy:<rule>" reasons)."""
    top = final.take(range(min(k, len(final))))
    new = is_new_item(top.created_at, now, new_item_days)
    rules: dict[str, int] = {}
    for r in top.reasons:
        if r.startswith("policy:"):
            rules[r[7:]] = rules.get(r[7:], 0) + 1
    return {"unique_brands": len(set(top.brands)), "longest_brand_run": longest_brand_run(top.brands),
            "novelty": float(new.mean()) if new is not None and len(top) else 0.0, "rules": rules}


class PolicyMetrics:
    """The ingress's Ray Serve custom metrics, tagged by model version and surface."""

    TAGS = ("model_version", "surface")

    def __init__(self) -> None:
        self.answers = metrics.Counter("recsys_policy_answers", "Answers served.", tag_keys=self.TAGS)
        self.unique_brands = metrics.Histogram("recsys_policy_unique_brands", "Unique brands among answered items.",
                                               boundaries=[1, 2, 3, 5, 8, 10, 15, 20, 50], tag_keys=self.TAGS)
        self.brand_run = metrics.Histogram("recsys_policy_longest_brand_run", "Longest same-brand run answered.",
                                           boundaries=[1, 2, 3, 4, 6, 10], tag_keys=self.TAGS)
        self.novelty = metrics.Histogram("recsys_policy_novelty", "Share of new items among answered items.",
                                         boundaries=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0], tag_keys=self.TAGS)
        self.rule_items = metrics.Counter("recsys_policy_rule_items", "Answered items a policy rule placed or moved.",
                                          tag_keys=(*self.TAGS, "rule"))
        self.latency = metrics.Histogram("recsys_policy_ms", "Policy stage milliseconds.",
                                         boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=self.TAGS)

    def record(self, version: str, page: str, figures: Mapping[str, Any], policy_ms: float) -> None:
        tags = {"model_version": version, "surface": page}
        self.answers.inc(1, tags)
        self.unique_brands.observe(figures["unique_brands"], tags)
        self.brand_run.observe(figures["longest_brand_run"], tags)
        self.novelty.observe(figures["novelty"], tags)
        self.latency.observe(policy_ms, tags)
        for rule, n in figures["rules"].items():
            self.rule_items.inc(n, {**tags, "rule": rule})


@serve.deployment(ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16})
@serve.ingress(app)
class Ingress:
    def __init__(self, feature_store: DeploymentHandle) -> None:
        self.feature_store = feature_store
        self.weights: dict[str, float] = {}
        self.pipelines: dict[str, DeploymentHandle] = {}
        self.policy, self.policy_version = PolicyConfig(), 0
        self.by_page: dict[str, PolicyConfig] = {}
        # [1] one registry for all replicas; detached so it outlives any replica, no CPU so it always fits
        self.registry = ray.remote(PolicyRegistry).options(name=REGISTRY_NAME, namespace=NAMESPACE,
                                                           lifetime="detached", get_if_exists=True,
                                                           num_cpus=0).remote()
        self.replica = serve.get_replica_context().replica_id.unique_id
        env_token = os.environ.get(ADMIN_TOKEN_ENV)
        self.env_token_sha256 = hashlib.sha256(env_token.encode()).hexdigest() if env_token else None
        self.token_sha256 = self.env_token_sha256
        self.metrics = PolicyMetrics()
        self.follower: asyncio.Task | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """{"versions": {"v1": 90, "v2": 10}, "policy": {...}, "admin_token_sha256": "..."}; a bad config raises
        and the old one stays."""
        unknown = set(user_config) - {"versions", "policy", "admin_token_sha256"}
        if unknown:
            raise ValueError(f"ingress user_config: unknown keys {sorted(unknown)}; expected 'versions', 'policy', "
                             "'admin_token_sha256'")
        weights = parse_weights(user_config.get("versions", {}))
        policy = PolicyConfig.from_dict(user_config.get("policy"))
        pipelines = {v: serve.get_app_handle(version_app_name(v)) for v in weights}  # [2] one app per version
        self.weights, self.pipelines = weights, pipelines
        self.token_sha256 = user_config.get("admin_token_sha256") or self.env_token_sha256
        self._use(*await self.registry.publish_base.remote(policy.to_dict()))
        if self.follower is None:  # [3] started on the replica's event loop, where requests run
            self.follower = asyncio.get_running_loop().create_task(self._follow())

    def _use(self, version: int, policy: dict[str, Any]) -> None:
        if version > self.policy_version:
            config = PolicyConfig.from_dict(policy)  # stored validated; parsing once here keeps requests cheap
            self.policy, self.by_page, self.policy_version = config, {}, version

    async def _follow(self) -> None:
        """Applies every new registry version as it appears; the poll itself tells the registry what runs here."""
        while True:
            try:
                self._use(*await self.registry.wait_newer.remote(self.replica, self.policy_version))
            except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as e:
                logger.warning(f"policy registry unreachable ({type(e).__name__}); retrying in 1 s")
                await asyncio.sleep(1.0)

    async def __del__(self) -> None:
        """Serve calls this when the replica shuts down: stop following and leave the registry, so an admin change
        does not wait for a replica that is gone (one that dies without it ages out after LIVE_S)."""
        if self.follower is not None:
            self.follower.cancel()
        try:
            await self.registry.leave.remote(self.replica)
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
            pass  # the registry is gone too: nothing to leave

    def _config_for(self, page: str) -> PolicyConfig:
        config = self.by_page.get(page)
        if config is None:
            config = self.by_page[page] = self.policy.for_page(page)
        return config

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest,
                        x_request_id: str | None = Header(None, max_length=128)) -> RecommendResponse:
        t0 = time.perf_counter()
        if req.version is not None and req.version not in self.pipelines:
            raise HTTPException(404, f"version {req.version!r} is not live; live versions: {sorted(self.pipelines)}")
        page = req.context.page or "none"
        try:
            policy = self._config_for(page).with_overrides(req.policy)
        except ValueError as e:
            raise _unprocessable(["policy"], str(e)) from e
        request_id = req.request_id or x_request_id or uuid.uuid4().hex
        version = req.version or choose_version(req.user_id, self.weights)
        t_features = time.perf_counter()
        state = await self.feature_store.get.remote(req.user_id)
        features_ms = (time.perf_counter() - t_features) * 1000.0
        context = req.context.model_dump()
        if policy.sponsored_items:  # asks the pipeline to keep these in the pool (see the report to VersionPipeline)
            context["include_items"] = list(policy.sponsored_items)
        try:
            out = await self.pipelines[version].recommend.remote(state, context, max(RANKED_PER_K * req.k, MIN_RANKED))
        except Exception as e:  # a failing stage answers with a clear error, never a hang or a crash
            raise HTTPException(503, f"version {version} could not answer: {type(e).__name__}: {e}") from e
        t_policy = time.perf_counter()
        now = time.time()
        rng = request_rng(request_id) if policy.explore_epsilon > 0 else None
        final = apply_policy(ranked_from_pipeline(out), UserState(state["bought_at"], now), policy, rng)
        policy_ms = (time.perf_counter() - t_policy) * 1000.0
        self.metrics.record(version, page, answer_figures(final, req.k, now, policy.new_item_days), policy_ms)
        items = [RecommendedItem(item_id=final.item_ids[i], score=float(final.scores[i]), brand=final.brands[i],
                                 category=final.categories[i], reason=final.reasons[i])
                 for i in range(min(req.k, len(final)))]
        timings = {"features": features_ms, **out["timings_ms"], "policy": policy_ms,
                   "total": (time.perf_counter() - t0) * 1000.0}
        return RecommendResponse(user_id=req.user_id, request_id=request_id, version=version,
                                 cold_start=out["cold_start"], items=items,
                                 timings_ms={k: round(v, 3) for k, v in timings.items()})

    @app.get("/admin/policy", response_model=PolicyStateResponse)
    async def get_policy(self, authorization: str | None = Header(None)) -> PolicyStateResponse:
        check_admin_token(authorization, self.token_sha256)
        version, policy = await self.registry.current.remote()
        return PolicyStateResponse(version=version, policy=policy,
                                   applied_replicas=await self.registry.applied.remote(version))

    @app.post("/admin/policy", response_model=PolicyStateResponse)
    async def set_policy(self, req: PolicyUpdateRequest,
                         authorization: str | None = Header(None)) -> PolicyStateResponse | JSONResponse:
        """Validates and applies a whole policy config to every ingress replica; 200 once all live replicas
        confirmed it, 504 (config stored, still spreading) when some did not within ACK_TIMEOUT_S."""
        check_admin_token(authorization, self.token_sha256)
        config = parse_policy(req.policy, ["policy"])
        version = await self.registry.set.remote(config.to_dict())
        deadline = time.monotonic() + ACK_TIMEOUT_S
        pending = await self.registry.pending.remote(version)
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            pending = await self.registry.pending.remote(version)
        body = PolicyStateResponse(version=version, policy=config.to_dict(), pending_replicas=pending,
                                   applied_replicas=await self.registry.applied.remote(version))
        if pending:
            return JSONResponse(body.model_dump(), status_code=504)
        return body

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
