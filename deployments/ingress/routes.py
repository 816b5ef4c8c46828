"""The HTTP routes and the `Ingress` deployment, which wires the concerns of the other modules together: each
route validates, delegates and answers.

No `from __future__ import annotations` here: Serve's class-based routes hand FastAPI the methods' signatures at
decoration time, and string annotations there are not resolved (the request body became a required query field).
"""

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import RayServeException
from ray.serve.handle import DeploymentHandle

from deployments.ingress.access import (API_KEY_HEADER, BodyLimit, api_key_digests, check_api_key, forbidden,
                                        operator_fields)
from deployments.backpressure import RETRY_AFTER_S, SHED
from deployments.ingress.admission import INGRESS_MAX_ONGOING, INGRESS_MIN_ADMITTED, AdaptiveLimit
from deployments.ingress.admin import (ADMIN_TOKEN_ENV, ROUTING_REGISTRY_NAME, PolicySteering, check_admin_token,
                                       parse_policy, registry_actor, unprocessable)
from deployments.ingress.impressions import ImpressionLog, answer_rows, open_impression_sink, policy_input_row
from deployments.ingress.metrics import PolicyMetrics, RequestMetrics, answer_figures
from deployments.ingress.request_path import STAGE_TIMEOUT_S, STORE_TIMEOUT_S, StageUnavailable, answer
from deployments.ingress.routing import LiveRouting, Routing, RoutingSteering, VersionStages, encode_table
from deployments.rollout import CONTROLLER_NAME, REPORT_S
from deployments.rollout.figures import Outcomes
from deployments.schemas import (EventsRequest, EventsResponse, ItemsRequest, ItemsResponse, LiveVersion,
                                 PolicyStateResponse, PolicyUpdateRequest, RecommendedItem, RecommendRequest,
                                 RecommendResponse, RolloutShiftRequest, RolloutStartRequest, RolloutVersionRequest,
                                 ShadowRequest, VersionsResponse)
from indexing.changes import ChangeLog, open_change_log
from training import NAMESPACE
from training.metrics import overlap_at_k, rank_correlation
from deployments.store import EMBEDDED, StoreClient, open_store
from training.request.clock import WALL, ServingClock
from training.request.policy_config import PolicyConfig

logger = logging.getLogger("ray.serve")
app = FastAPI(title="recsys", description="Multi-stage recommendations: retrieval, ranking, policy.")
app.add_middleware(BodyLimit)


class _AsciiJSON(JSONResponse):
    """JSON with every non-ASCII character escaped: an error may quote a string with an unpaired surrogate, which
    UTF-8 cannot encode (FastAPI's own 422 answer then fails with a 500)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


@app.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 naming each bad field (`loc`), without echoing the input back (it may be huge or not encodable)."""
    return _AsciiJSON({"detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                                  for e in exc.errors()]}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's bare 400 for a body it cannot even decode becomes a 422 naming the body; every other error keeps
    its status, detail and headers."""
    if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
        return _AsciiJSON({"detail": [{"loc": ["body"], "msg": "the body is not decodable JSON",
                                       "type": "json_invalid"}]}, status_code=422)
    return _AsciiJSON({"detail": exc.detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))
USER_CONFIG_KEYS = ("versions", "buckets", "policy", "admin_token_sha256", "api_keys_sha256", "candidates",
                    "stage_timeout_s", "store_timeout_s")
CANDIDATES = 500  # retrieved per request and ranked
MAX_SHADOW_IN_FLIGHT = 4  # shadow answers running at once per replica; beyond it a shadow sample is skipped


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # Serve's local testing mode runs no replica actor
        return f"local-{uuid.uuid4().hex[:8]}"


# [2] Few requests per replica and almost no queue: beyond them the proxy sheds at once, cheaply, with Retry-After
# (an admitted request never waits behind a queue), and within them the ingress's adaptive limit
# (ingress/admission.py) sheds what the stages cannot serve at near-unloaded latency.
@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=INGRESS_MAX_ONGOING, max_queued_requests=2,
                  backpressure_config=SHED,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 2})
@serve.ingress(app)
class Ingress:
    def __init__(self, store: StoreClient | None = None, registry: Any = None,
                 stages: dict[str, dict[str, DeploymentHandle]] | None = None, store_spec: str = EMBEDDED,
                 routing_registry: Any = None, controller: Any = None, impressions: str = "") -> None:
        """Collaborators default to the cluster's: the online store (`store_spec`: the embedded actor or a redis://
        URL), the policy and routing registry actors, the rollout controller, and each live version's deployments
        looked up by handle. Serve's local testing mode passes in-process ones instead (`tests/unit/deployments`): a
        store, `SteeringRegistry`s, and {version: {"retrieval", "ranking", "version"}} bound deployments.
        `impressions`: where every answer's shown items are logged (`deployments.ingress.impressions`; "" off)."""
        self.store = store or open_store(store_spec)
        replica = _replica_id()
        fixed = {v: VersionStages(**s) for v, s in (stages or {}).items()}
        self.routing = RoutingSteering(routing_registry or registry_actor(ROUTING_REGISTRY_NAME), replica, fixed)
        self.replica, self.outcomes, self._controller = replica, Outcomes(), controller
        self._controller_looked_up, self._reporter, self._shadows = 0.0, None, set()
        self.request_metrics = RequestMetrics()
        self.candidates, self.stage_timeout_s, self.store_timeout_s = CANDIDATES, STAGE_TIMEOUT_S, STORE_TIMEOUT_S
        self.api_keys = api_key_digests(None)
        self.steering = PolicySteering(registry or registry_actor(), replica)
        env_token = os.environ.get(ADMIN_TOKEN_ENV)
        self.env_token_sha256 = hashlib.sha256(env_token.encode()).hexdigest() if env_token else None
        self.token_sha256 = self.env_token_sha256
        self.metrics = PolicyMetrics()
        self.admission = AdaptiveLimit(initial=INGRESS_MAX_ONGOING, min_limit=INGRESS_MIN_ADMITTED,
                                       max_limit=INGRESS_MAX_ONGOING)
        self._store_stats: dict[str, Any] | None = None  # the store's first stats answer (its backend, durability)
        self._change_logs: dict[str, ChangeLog] = {}  # the catalog change logs POST /admin/items writes to
        self._clocks: dict[str, ServingClock] = {}  # per version, asked of its Version deployment once
        sink = open_impression_sink(impressions)
        dropped = metrics.Counter("recsys_impressions_dropped", "Impression rows not logged (buffer full or the "
                                  "log unavailable).")
        self.impressions = ImpressionLog(sink, on_drop=lambda n: dropped.inc(n)) if sink is not None else None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """{"versions": {"v1": 90, "v2": 10}, "policy": {...}, "admin_token_sha256": "...", "candidates": 500}; a
        bad config raises and the old one stays."""
        unknown = set(user_config) - set(USER_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"ingress user_config: unknown keys {sorted(unknown)}; expected {list(USER_CONFIG_KEYS)}")
        # the same on every replica: a function of the user_config; a rollout publishes newer ones (routing.py)
        routing = Routing.from_dict({k: user_config[k] for k in ("versions", "buckets") if k in user_config})
        policy = PolicyConfig.from_dict(user_config.get("policy"))
        candidates = user_config.get("candidates", CANDIDATES)
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"ingress user_config.candidates: a positive integer, got {candidates!r}")
        timeouts = {}
        for key, default in (("stage_timeout_s", STAGE_TIMEOUT_S), ("store_timeout_s", STORE_TIMEOUT_S)):
            timeouts[key] = user_config.get(key, default)
            if isinstance(timeouts[key], bool) or not isinstance(timeouts[key], (int, float)) or timeouts[key] <= 0:
                raise ValueError(f"ingress user_config.{key}: a positive number of seconds, got {timeouts[key]!r}")
        api_keys = api_key_digests(user_config.get("api_keys_sha256"))
        self.candidates, self.api_keys = candidates, api_keys
        self.stage_timeout_s, self.store_timeout_s = float(timeouts["stage_timeout_s"]), float(timeouts["store_timeout_s"])
        self.token_sha256 = user_config.get("admin_token_sha256") or self.env_token_sha256
        await self.steering.publish_base(policy.to_dict())
        await self.routing.publish_base(routing.to_dict())  # [1] each version's stages by handle
        if self._reporter is None:
            self._reporter = asyncio.get_running_loop().create_task(self._report())

    async def __del__(self) -> None:
        """Serve calls this when the replica shuts down."""
        await self.steering.leave()
        await self.routing.leave()
        if self.impressions is not None:
            await self.impressions.close()  # what the buffer holds is written before the replica goes

    @app.post("/recommend", response_model=RecommendResponse)
    async def recommend(self, req: RecommendRequest, x_request_id: str | None = Header(None, max_length=128),
                        authorization: str | None = Header(None, max_length=1024),
                        x_api_key: str | None = Header(None, alias=API_KEY_HEADER, max_length=256)) -> RecommendResponse:
        t0 = time.perf_counter()
        check_api_key(x_api_key, self.api_keys)
        reserved = operator_fields(req.policy)
        if reserved:
            if not authorization:
                raise forbidden(reserved)
            check_admin_token(authorization, self.token_sha256)
        live = self.routing.live  # [3] read once: the request's version and its stages never change under it
        if req.version is not None and req.version not in live.stages:
            raise HTTPException(404, f"version {req.version!r} is not live; live versions: {sorted(live.stages)}")
        surface = self.steering.surface(req.context.page)
        try:
            policy = self.steering.config_for(surface).with_overrides(req.policy)
        except ValueError as e:
            raise unprocessable(["policy"], str(e)) from e
        request_id = req.request_id or x_request_id or uuid.uuid4().hex
        version = req.version or live.choose(req.user_id)
        if not self.admission.try_admit():  # [2] beyond what the stages serve at near-unloaded latency
            raise HTTPException(503, "overloaded: retry after the time in Retry-After",
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        t_admitted = time.perf_counter()
        context, item_filter = req.context.model_dump(), req.filters.to_filter()
        try:
            out = await answer(req.user_id, context, req.k, live.stages[version], self.store, policy,
                               request_id, self.candidates, item_filter, self.stage_timeout_s, self.store_timeout_s)
        except StageUnavailable as e:  # shed or timed out: at once, with when to come back
            self.outcomes.record(version, 0.0, error=True)
            raise HTTPException(e.status_code, f"version {version} is overloaded: {e}",
                                headers={"Retry-After": str(max(1, round(e.retry_after_s)))}) from e
        except Exception as e:  # a failing stage answers with a clear error, never a hang or a crash
            self.outcomes.record(version, 0.0, error=True)
            raise HTTPException(503, f"version {version} could not answer: {type(e).__name__}: {e}") from e
        finally:  # only requests that ran the stages teach the limit what latency they get
            self.admission.done(time.perf_counter() - t_admitted)
        mixed = out.mixed(version)
        if mixed:  # never served: an answer is one version's (the rollout's guards halt on this)
            self.outcomes.record(version, 0.0, error=True, mixed=True)
            raise HTTPException(503, f"version {version}: parts of the answer came from other versions: {mixed}")
        final = out.final
        if self.impressions is not None:  # buffered only: written off the request path
            self.impressions.record(
                answer_rows(request_id, req.user_id, version, surface, final, req.k, out.now),
                policy_input_row(request_id, req.user_id, version, surface, req.k, policy, out.ranked,
                                 out.bought_at, out.now) if out.ranked is not None else None)
        self.metrics.record(version, surface, answer_figures(final, req.k, out.now, policy.new_item_days),
                            out.timings_ms["policy"])
        items = [RecommendedItem(item_id=final.item_ids[i], score=float(final.scores[i]), brand=final.brands[i],
                                 category=final.categories[i], reason=final.reasons[i])
                 for i in range(min(req.k, len(final)))]
        timings = {**out.timings_ms, "total": (time.perf_counter() - t0) * 1000.0}
        self.outcomes.record(version, timings["total"], empty=not items)
        self.request_metrics.record(version, timings)
        shadow = live.routing.shadow
        if shadow and shadow != version and self.outcomes.rng.random() < live.routing.shadow_share:
            self._start_shadow(live, shadow, (req.user_id, context, req.k), policy, request_id, item_filter,
                               final.item_ids[:req.k])
        return RecommendResponse(user_id=req.user_id, request_id=request_id, version=version,
                                 cold_start=out.cold_start, partial=out.partial, store_fallback=out.store_fallback,
                                 items=items, stage_versions=out.stage_versions,
                                 served_at=datetime.fromtimestamp(out.now, tz=timezone.utc),
                                 timings_ms={k: round(v, 3) for k, v in timings.items()})

    def _start_shadow(self, live: LiveRouting, version: str, request: tuple[str, dict, int], policy: PolicyConfig,
                      request_id: str, item_filter: Any, served: list[str]) -> None:
        """Answers the request again with the shadow version, off the response's path; keeps only the diff."""
        if len(self._shadows) >= MAX_SHADOW_IN_FLIGHT:
            return
        user_id, context, k = request

        async def run() -> None:
            t0 = time.perf_counter()
            try:
                out = await answer(user_id, context, k, live.stages[version], self.store, policy, request_id,
                                   self.candidates, item_filter, self.stage_timeout_s, self.store_timeout_s)
            except Exception:  # noqa: BLE001 - a failing shadow counts as its error, never the user's
                self.outcomes.record_shadow(version, None, None, None)
                return
            ms = (time.perf_counter() - t0) * 1000.0
            mine = out.final.item_ids[:k]
            overlap, tau = overlap_at_k(served, mine, k), rank_correlation(served, mine, k)
            self.outcomes.record_shadow(version, ms, overlap, tau)
            self.request_metrics.record_shadow(version, ms, overlap)

        task = asyncio.get_running_loop().create_task(run())
        self._shadows.add(task)
        task.add_done_callback(self._shadows.discard)

    def _controller_handle(self) -> Any:
        """The rollout controller, looked up by name at most every 10 s (None while there is none)."""
        if self._controller is None and time.monotonic() - self._controller_looked_up > 10.0:
            self._controller_looked_up = time.monotonic()
            import ray

            try:
                self._controller = ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE) if ray.is_initialized() else None
            except ValueError:  # none yet
                self._controller = None
        return self._controller

    async def _report(self) -> None:
        """Every REPORT_S, this replica's per-version figures to the rollout controller (its guards and status)."""
        while True:
            await asyncio.sleep(REPORT_S)
            snapshot = self.outcomes.flush()
            controller = self._controller_handle() if snapshot else None
            if controller is None:
                continue
            try:
                await controller.report.remote(self.replica, time.time(), snapshot)
            except Exception:  # noqa: BLE001 - a controller gone: look it up again later
                self._controller = None

    async def _rollout(self, authorization: str | None, method: str, *args: Any) -> JSONResponse:
        """An admin rollout operation, run by the rollout controller: its (status, body) as the answer."""
        check_admin_token(authorization, self.token_sha256)
        controller = self._controller_handle()
        if controller is None:
            raise HTTPException(503, "no rollout controller runs in this cluster: `recsys serve` starts one "
                                     "(cluster.serving.start_rollout)", headers={"Retry-After": "10"})
        try:
            status, body = await getattr(controller, method).remote(*args)
        except Exception as e:  # noqa: BLE001 - the controller died or failed: say so, never hang
            self._controller = None
            raise HTTPException(503, f"rollout controller: {type(e).__name__}: {e}") from e
        return _AsciiJSON(body, status_code=status)

    @app.get("/admin/rollout")
    async def rollout_status(self, authorization: str | None = Header(None)) -> JSONResponse:
        """The live routing, the current rollout (phase, gate report, steps) and the last minute's figures."""
        return await self._rollout(authorization, "status")

    @app.post("/admin/rollout/start", status_code=202)
    async def rollout_start(self, req: RolloutStartRequest, authorization: str | None = Header(None)) -> JSONResponse:
        """Deploys a candidate beside the live versions (its own index and application, no traffic) and runs the
        gate; poll GET /admin/rollout for its outcome."""
        return await self._rollout(authorization, "start", req.version, req.bundle)

    @app.post("/admin/rollout/gate", status_code=202)
    async def rollout_gate(self, authorization: str | None = Header(None)) -> JSONResponse:
        """Runs the gate again on the deployed candidate (after a change of thresholds)."""
        return await self._rollout(authorization, "regate")

    @app.post("/admin/rollout/shift", status_code=202)
    async def rollout_shift(self, req: RolloutShiftRequest, authorization: str | None = Header(None)) -> JSONResponse:
        return await self._rollout(authorization, "shift", req.version, req.to, req.every_s)

    @app.post("/admin/rollout/rollback")
    async def rollout_rollback(self, authorization: str | None = Header(None)) -> JSONResponse:
        return await self._rollout(authorization, "rollback")

    @app.post("/admin/rollout/retire")
    async def rollout_retire(self, req: RolloutVersionRequest,
                             authorization: str | None = Header(None)) -> JSONResponse:
        return await self._rollout(authorization, "retire", req.version)

    @app.post("/admin/rollout/shadow")
    async def rollout_shadow(self, req: ShadowRequest, authorization: str | None = Header(None)) -> JSONResponse:
        return await self._rollout(authorization, "shadow", req.version, req.share)

    async def routing_table(self) -> list[list[Any]]:
        """The live routing table as runs (not an HTTP route): what the next deploy re-weights from."""
        return encode_table(list(self.routing.live.routing.table))

    @app.get("/admin/policy", response_model=PolicyStateResponse)
    async def get_policy(self, authorization: str | None = Header(None)) -> PolicyStateResponse:
        check_admin_token(authorization, self.token_sha256)
        version, policy = await self.steering.registry.current()
        return PolicyStateResponse(version=version, policy=policy,
                                   applied_replicas=await self.steering.registry.applied(version))

    @app.post("/admin/policy", response_model=PolicyStateResponse)
    async def set_policy(self, req: PolicyUpdateRequest,
                         authorization: str | None = Header(None)) -> PolicyStateResponse | JSONResponse:
        """Validates and applies a whole policy config to every ingress replica; 200 once all live replicas
        confirmed it, 504 (config stored, still spreading) when some did not in time."""
        check_admin_token(authorization, self.token_sha256)
        config = parse_policy(req.policy, ["policy"])
        version, pending, applied = await self.steering.set(config.to_dict())
        body = PolicyStateResponse(version=version, policy=config.to_dict(), pending_replicas=pending,
                                   applied_replicas=applied)
        if pending:
            return JSONResponse(body.model_dump(), status_code=504)
        return body

    @app.post("/admin/items", response_model=ItemsResponse)
    async def items(self, req: ItemsRequest, authorization: str | None = Header(None)) -> ItemsResponse:
        """Writes catalog changes (new items, attribute changes, deletions) to the change log the live versions
        follow; every replica of theirs applies them within about a second, without a rebuild (`GET /healthz`
        shows the offset each has applied). 200 once the log has them durably."""
        check_admin_token(authorization, self.token_sha256)
        live = self.routing.live
        specs = await asyncio.gather(*[live.stages[v].version.change_log.remote() for v in live.routing.weights])
        specs = sorted({s for s in specs if s})
        if not specs:
            raise HTTPException(409, "no live version follows a change log (serving.changes is off)")
        now = (await self._clock()).now()  # one creation time for every log, on the serving clock
        changes = [dataclasses.replace(c, created_at=now) if c.op == "upsert" and c.created_at is None else c
                   for c in (m.to_change() for m in req.changes)]
        try:
            offsets = [await asyncio.to_thread(self._change_log(spec).append, changes) for spec in specs]
        except OSError as e:  # not written: the caller must send them again
            raise HTTPException(503, f"change log unavailable, changes not written: {e}",
                                headers={"Retry-After": "1"}) from e
        return ItemsResponse(offset=offsets[-1], accepted=len(changes), logs=len(specs))

    async def _clock(self) -> ServingClock:
        """The serving clock of the version with the largest share of traffic (`training.request.clock`), asked of
        its Version deployment once and kept; the wall clock while it cannot be asked."""
        live = self.routing.live
        weights = live.routing.weights
        if not weights:
            return WALL
        main = max(sorted(weights), key=lambda v: weights[v])
        if main not in self._clocks:
            try:
                self._clocks[main] = ServingClock.from_dict(
                    await asyncio.wait_for(live.stages[main].version.clock.remote(), self.stage_timeout_s))
            except Exception as e:  # noqa: BLE001 - asked again on the next call
                logger.warning(f"serving clock of {main} unavailable, using the wall clock: {type(e).__name__}: {e}")
                return WALL
        return self._clocks[main]

    def _change_log(self, spec: str) -> ChangeLog:
        if spec not in self._change_logs:
            self._change_logs[spec] = open_change_log(spec)
        return self._change_logs[spec]

    @app.post("/events", response_model=EventsResponse)
    async def events(self, req: EventsRequest,
                     x_api_key: str | None = Header(None, alias=API_KEY_HEADER, max_length=256)) -> EventsResponse:
        """Stores the events (views too, with position and context) and answers once the store acknowledged them;
        `durable` says whether they survive a restart (Redis) or not (the embedded store)."""
        check_api_key(x_api_key, self.api_keys)
        now = (await self._clock()).now()  # events without a timestamp happen now on the serving clock
        rows = [{"user_id": e.user_id, "item_id": e.item_id, "action": e.action,
                 "ts": (e.timestamp.replace(tzinfo=e.timestamp.tzinfo or timezone.utc).timestamp()
                        if e.timestamp else now), "position": e.position,
                 "context": e.context.model_dump(exclude_none=True) if e.context else None} for e in req.events]
        try:
            accepted, stats = await asyncio.wait_for(self._append(rows), self.stage_timeout_s)
        except Exception as e:  # noqa: BLE001 - not stored: the client must send them again
            raise HTTPException(503, f"online store unavailable, events not stored: {type(e).__name__}",
                                headers={"Retry-After": "1"}) from e
        return EventsResponse(accepted=accepted, durable=bool(stats.get("durable")))

    async def _append(self, rows: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
        accepted = await self.store.append(rows)
        if self._store_stats is None:
            self._store_stats = await self.store.stats()
        return accepted, self._store_stats

    @app.get("/versions", response_model=VersionsResponse)
    async def versions(self) -> VersionsResponse:
        live = self.routing.live
        weights = live.routing.weights
        infos = await asyncio.gather(*[live.stages[v].version.info.remote() for v in weights])
        return VersionsResponse(versions=[LiveVersion(version=v, weight=weights[v], bundle=i["bundle"],
                                                      index=i["index"], order=i.get("order"))
                                          for v, i in zip(weights, infos)])

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        live = self.routing.live
        weights = live.routing.weights
        results = await asyncio.gather(*[live.stages[v].version.health.remote() for v in weights],
                                       self.store.stats(), return_exceptions=True)
        failed = {name: f"{type(r).__name__}: {r}" for name, r in zip([*weights, "online_store"], results)
                  if isinstance(r, BaseException)}
        # each version's stages as one of their replicas answered: layout, shards, vectors, change-log offset
        stages = {v: r for v, r in zip(weights, results) if not isinstance(r, BaseException)}
        body = {"status": "ok" if not failed else "unavailable", "failed": failed, "versions": dict(weights),
                "admission": self.admission.stats(), "stages": stages}
        return JSONResponse(body, status_code=200 if not failed else 503)
