"""The rollout controller: one detached actor (`recsys-rollout`) that runs a version's rollout from deployment to
retirement, driven by the admin endpoints (`/admin/rollout/*`) and `recsys rollout`.

    start VERSION BUNDLE   index built (unless a verified one exists) -> application `recsys-VERSION` deployed ->
                           live at weight 0 (forcible, shadowable, owns no users) -> the gate
    gate                   the gate again on the deployed candidate (after a change of thresholds)
    shift VERSION STEPS    each step re-weights (users move only from shrinking versions to it), then watches the
                           live guards for `every_s`; a tripped guard rolls back by itself
    rollback               the routing from before the rollout, bucket for bucket, in one publish
    retire VERSION         out of the routing, a grace for requests that had chosen it, then its application and
                           its index shard actors are deleted
    shadow VERSION SHARE   a share of live requests is also answered by VERSION; only the diff is kept

Serve's own calls (`serve.run`, `serve.delete`) block, so they run in a thread; everything else is asyncio on the
actor's loop. Operations answer (status code, body): 202 for work that goes on in the background, 409 for an
operation the rollout's phase does not allow, 422 naming the field of a bad argument.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray import serve

from deployments.app import QUIET, ServingConfig, build_version_app
from deployments.ingress.admin import REGISTRY_NAME, ROUTING_REGISTRY_NAME, publish, registry_actor
from deployments.ingress.request_path import answer
from deployments.ingress.routing import Routing, VersionStages, shifted_weights, version_app_name
from deployments.rollout import CONTROLLER_NAME
from deployments.rollout.figures import aggregate
from deployments.rollout.gate import RolloutConfig, evaluate_gate, offline_figures, order_flags, tripped_guard
from deployments.store import open_store
from indexing.embed import (IndexConfig, drop_shards, embed_catalog, get_shards, has_index_manifest,
                           read_index_manifest)
from training import NAMESPACE
from training.fit.bundle import load_bundle
from training.metrics import overlap_at_k, rank_correlation
from training.request.policy_config import PolicyConfig

logger = logging.getLogger(__name__)
KEEP_REPORTS_S = 600.0  # the ingress reports kept for status and guards
GATE_CONCURRENCY = 2  # replayed requests in flight at once, per version


@dataclass
class Rollout:
    """One candidate's rollout: what it replaced, where it is, what the gate and each step measured."""

    green: str
    bundle: str
    blue: dict[str, float]  # the weights before the rollout
    blue_routing: dict[str, Any]  # the routing before it (rollback restores its buckets)
    phase: str = "indexing"  # indexing, deploying, validating, ready, failed, shifting, live, rolled_back, retired
    started_at: float = field(default_factory=time.time)
    gate: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    error: str | None = None

    def log(self, msg: str) -> None:
        self.events.append(f"{time.strftime('%H:%M:%S')} {msg}")
        logger.info(f"rollout {self.green}: {msg}")


def index_ok(bundle_dir: str, version: str, n_items: int) -> bool:
    """A verified index of this version exists: its manifest names the version and holds every catalog item."""
    if not has_index_manifest(bundle_dir):
        return False
    try:
        manifest = read_index_manifest(bundle_dir)
    except ValueError:
        return False
    if manifest.get("version") != version or sum(s["ntotal"] for s in manifest["shards"]) != n_items:
        return False
    try:  # the shard actors too: a retired version's were stopped, and a sharded layout searches them
        get_shards(manifest)
    except ValueError:
        return False
    return True


class RolloutController:
    def __init__(self, serving: ServingConfig, index: IndexConfig, cfg: RolloutConfig,
                 sample_users: list[dict[str, Any]] | None = None) -> None:
        """sample_users: [{"user_id", "context"}] to top up the gate's recorded requests (the shop's users)."""
        self.serving, self.index, self.cfg = serving, index, cfg
        self.sample_users = list(sample_users or [])
        self.routing = registry_actor(ROUTING_REGISTRY_NAME)
        self.policy = registry_actor(REGISTRY_NAME)
        self.store = open_store(serving.store)
        self.rollout: Rollout | None = None
        self.task: asyncio.Task | None = None
        self.reports: deque[tuple[float, str, dict[str, Any]]] = deque()

    async def configure(self, serving: ServingConfig, index: IndexConfig, cfg: RolloutConfig,
                        sample_users: list[dict[str, Any]] | None = None) -> None:
        """A serving session's configs for an existing controller (its rollout state stays)."""
        self.serving, self.index, self.cfg = serving, index, cfg
        self.sample_users = list(sample_users or [])
        self.store = open_store(serving.store)

    # -- the ingress's figures -------------------------------------------------------------------------------------
    async def report(self, replica: str, t: float, snapshot: dict[str, Any]) -> None:
        self.reports.append((t, replica, snapshot))
        while self.reports and self.reports[0][0] < time.time() - KEEP_REPORTS_S:
            self.reports.popleft()

    def figures(self, since: float, until: float | None = None) -> dict[str, Any]:
        until = until or float("inf")
        return aggregate(s for t, _, s in self.reports if since <= t <= until)

    # -- state -----------------------------------------------------------------------------------------------------
    async def live_routing(self) -> Routing | None:
        version, value = await self.routing.current()
        return Routing.from_dict(value) if version else None

    async def status(self) -> tuple[int, dict[str, Any]]:
        live = await self.live_routing()
        body: dict[str, Any] = {"routing": None if live is None else {
            "weights": live.weights, "shares": live.shares(),
            "shadow": {"version": live.shadow, "share": live.shadow_share} if live.shadow else None},
            "rollout": None if self.rollout is None else asdict(self.rollout),
            "busy": self.task is not None and not self.task.done(),
            "last_60s": self.figures(time.time() - 60.0), "config": self.cfg.to_dict()}
        return 200, body

    def _busy(self) -> tuple[int, dict[str, Any]] | None:
        if self.task is not None and not self.task.done():
            return 409, {"detail": f"rollout of {self.rollout.green} is {self.rollout.phase}; wait, or roll back"}
        return None

    async def _publish(self, routing: Routing) -> None:
        version, pending, applied = await publish(self.routing, routing.to_dict())
        if pending:  # they apply it at their next poll; the operation does not fail for a slow replica
            logger.warning(f"routing {version}: {len(pending)} replicas had not confirmed within the wait: {pending}")

    def _run(self, coro: Any) -> None:
        self.task = asyncio.get_running_loop().create_task(coro)

    # -- start: index, deploy, gate --------------------------------------------------------------------------------
    async def start(self, version: str, bundle_dir: str) -> tuple[int, dict[str, Any]]:
        if busy := self._busy():
            return busy
        live = await self.live_routing()
        if live is None:
            return 409, {"detail": "no ingress has published its routing yet: deploy the HTTP application first"}
        if version in live.weights:
            return 409, {"detail": f"version {version!r} is already live (weight {live.weights[version]}); "
                                   "retire it first or choose another name"}
        path = Path(bundle_dir)
        try:
            bundle = load_bundle(path)
        except (FileNotFoundError, ValueError) as e:
            return 422, {"detail": [{"loc": ["body", "bundle"], "msg": str(e), "type": "value_error"}]}
        if bundle.version != version:
            return 422, {"detail": [{"loc": ["body", "version"], "type": "value_error",
                                     "msg": f"the bundle at {bundle_dir} is version {bundle.version!r}"}]}
        self.rollout = Rollout(version, str(path.resolve()), dict(live.weights), live.to_dict())
        self._run(self._start(len(bundle.items)))
        return 202, (await self.status())[1]

    async def _start(self, n_items: int) -> None:
        r = self.rollout
        try:
            if index_ok(r.bundle, r.green, n_items):
                r.log("verified index found: reusing it")
            else:
                r.log("building the index")
                manifest = await asyncio.to_thread(embed_catalog, r.bundle, self.index)
                r.log(f"index built: {manifest['n_items']} items in {len(manifest['shards'])} shards, "
                      f"{manifest['build_seconds']:.1f} s")
            r.phase = "deploying"
            serving = await self._serving_for_green()
            await asyncio.to_thread(serve.run, build_version_app(r.bundle, r.green, serving),
                                    name=version_app_name(r.green), route_prefix=None, logging_config=QUIET)
            live = await self.live_routing()
            await self._publish(Routing.make({**live.weights, r.green: 0.0}, live.table, live.shadow,
                                             live.shadow_share))
            r.log("deployed and live at weight 0")
        except Exception as e:  # noqa: BLE001 - the rollout fails with its reason; nothing took traffic
            r.phase, r.error = "failed", f"{type(e).__name__}: {e}"
            r.log(f"failed: {r.error}")
            return
        await self._regate()

    async def _serving_for_green(self) -> ServingConfig:
        """The candidate follows the catalog change log the serving versions follow, wherever its bundle lies (the
        default log is the file beside a bundle's folder, which a bundle trained elsewhere would not share)."""
        r = self.rollout
        if self.serving.changes != "auto" or not r.blue:
            return self.serving
        blue = max(r.blue, key=lambda v: r.blue[v])
        try:
            spec = await asyncio.wait_for(VersionStages.of(blue).version.change_log.remote(), 30.0)
        except Exception as e:  # noqa: BLE001 - the candidate falls back to its own default log, and says so
            r.log(f"could not ask {blue} for its change log ({type(e).__name__}); using the default")
            return self.serving
        if spec:
            r.log(f"follows the catalog change log of {blue}")
        return replace(self.serving, changes=spec or "off")

    async def regate(self) -> tuple[int, dict[str, Any]]:
        """Runs the gate again on the deployed candidate (after a threshold change, or to measure it anew)."""
        if busy := self._busy():
            return busy
        r = self.rollout
        if r is None or r.phase not in ("ready", "failed") or r.gate is None:
            return 409, {"detail": "only a deployed candidate that was gated (ready or failed) is gated again"
                                   + (f"; the rollout of {r.green} is {r.phase}" if r else "")}
        self._run(self._regate())
        return 202, (await self.status())[1]

    async def _regate(self) -> None:
        r = self.rollout
        r.phase, r.error = "validating", None
        try:
            r.gate = await self._gate()
            r.phase = "ready" if r.gate["passed"] else "failed"
            r.log("gate passed" if r.gate["passed"] else
                  f"gate failed: {[c['check'] for c in r.gate['checks'] if not c['passed']]}")
        except Exception as e:  # noqa: BLE001 - a gate that cannot run fails the candidate, with its reason
            r.phase, r.error = "failed", f"{type(e).__name__}: {e}"
            r.log(f"failed: {r.error}")

    async def _gate(self) -> dict[str, Any]:
        r = self.rollout
        blue = max(r.blue, key=lambda v: r.blue[v])
        stages = {v: VersionStages.of(v) for v in (blue, r.green)}
        try:
            await asyncio.wait_for(stages[r.green].version.health.remote(), 30.0)
            health = {"ok": True, "detail": "retrieval, index shards and ranking answer"}
        except Exception as e:  # noqa: BLE001 - reported as the failed check
            health = {"ok": False, "detail": f"{type(e).__name__}: {e}"}
        replay = await self._replay(blue, stages)
        metrics = {v: load_bundle(b).metrics for v, b in
                   ((blue, await self._bundle_of(stages[blue])), (r.green, r.bundle))}
        offline = {v: offline_figures(m) for v, m in metrics.items()}
        report = evaluate_gate(self.cfg, health, replay, offline[blue], offline[r.green])
        report.update(blue=blue, sources=replay["sources"], flags=order_flags(metrics[r.green]))
        return report

    async def _bundle_of(self, stages: VersionStages) -> str:
        return (await stages.version.info.remote())["bundle"]

    async def _requests(self) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The gate's requests: users and contexts of recently posted events (recorded traffic), then the shop's
        users (generated), distinct users, `gate_requests` of them."""
        n = self.cfg.gate_requests
        seen, out = set(), []
        try:
            recorded = await self.store.recent_log(n * 20)
        except Exception:  # noqa: BLE001 - no recorded traffic: generated requests only
            recorded = []
        for e in reversed(recorded):
            if e["user_id"] not in seen and len(out) < n:
                seen.add(e["user_id"])
                out.append({"user_id": e["user_id"], "context": dict(e.get("context") or {})})
        n_recorded = len(out)
        for u in self.sample_users:
            if len(out) >= n:
                break
            if u["user_id"] not in seen:
                seen.add(u["user_id"])
                out.append(u)
        return out, {"recorded": n_recorded, "generated": len(out) - n_recorded}

    async def _replay(self, blue: str, stages: dict[str, VersionStages]) -> dict[str, Any]:
        requests, sources = await self._requests()
        _, policy_value = await self.policy.current()
        policy = PolicyConfig.from_dict(policy_value or None)
        k = self.cfg.gate_k
        figures = {v: {"errors": 0, "empty": 0, "timings": {}} for v in stages}
        answers: dict[str, list[list[str] | None]] = {v: [None] * len(requests) for v in stages}
        gate = asyncio.Semaphore(GATE_CONCURRENCY)

        async def one(i: int, req: dict[str, Any], version: str) -> None:
            context = {key: req["context"].get(key) for key in ("country", "device", "page", "category", "query")}
            async with gate:
                t0 = time.perf_counter()
                try:
                    out = await answer(req["user_id"], context, k, stages[version], self.store,
                                       policy.for_page(context["page"]), f"gate-{i}", self.serving.candidates,
                                       timeout_s=self.serving.stage_timeout_s,
                                       store_timeout_s=self.serving.store_timeout_s)
                except Exception:  # noqa: BLE001 - counted: the gate's error rate
                    figures[version]["errors"] += 1
                    return
            if out.mixed(version):
                figures[version]["errors"] += 1
                return
            timings = {**out.timings_ms, "total": (time.perf_counter() - t0) * 1000.0}
            for stage, ms in timings.items():
                figures[version]["timings"].setdefault(stage, []).append(ms)
            answers[version][i] = out.final.item_ids[:k]
            figures[version]["empty"] += int(len(out.final) == 0)

        for version in stages:  # one version after the other: each is timed without the other's load
            await asyncio.gather(*[one(i, req, version) for i, req in enumerate(requests)])
        pairs = [(a, b) for a, b in zip(answers[blue], answers[self.rollout.green]) if a is not None and b is not None]
        return {"requests": len(requests), "sources": sources, "green": figures[self.rollout.green],
                "blue_figures": figures[blue],
                "overlap": [overlap_at_k(a, b, k) for a, b in pairs],
                "tau": [rank_correlation(a, b, k) for a, b in pairs]}

    # -- shift, rollback -------------------------------------------------------------------------------------------
    async def shift(self, version: str, to: list[float], every_s: float) -> tuple[int, dict[str, Any]]:
        if busy := self._busy():
            return busy
        r = self.rollout
        if r is None or r.green != version:
            return 409, {"detail": f"no rollout of {version!r}: start it first (`recsys rollout start {version}`)"}
        if r.phase not in ("ready", "live", "rolled_back"):
            return 409, {"detail": f"rollout of {version} is {r.phase}: only a version that passed the gate shifts"
                         + (f" ({r.error})" if r.error else "")}
        live = await self.live_routing()
        if version not in live.weights:
            return 409, {"detail": f"{version} is no longer live (retired?)"}
        self._run(self._shift([float(p) for p in to], float(every_s)))
        return 202, (await self.status())[1]

    async def _shift(self, to: list[float], every_s: float) -> None:
        r = self.rollout
        r.phase = "shifting"
        for percent in to:
            live = await self.live_routing()
            await self._publish(Routing.make(shifted_weights(live.weights, r.green, percent, live.table), live.table,
                                             live.shadow, live.shadow_share))
            step = {"percent": percent, "started_at": time.time(), "ended_at": None, "status": "running"}
            r.steps.append(step)
            r.log(f"{r.green} at {percent:g}%")
            deadline = time.monotonic() + every_s
            while True:
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
                figures = self.figures(step["started_at"])
                step["figures"] = figures["versions"]
                reason = tripped_guard(self.cfg, figures["versions"].get(r.green))
                if reason:
                    step.update(status="tripped", ended_at=time.time(), reason=reason)
                    r.log(f"guard tripped at {percent:g}%: {reason}; rolling back")
                    await self._rollback(f"guard: {reason}")
                    return
                if time.monotonic() >= deadline:
                    break
            step.update(status="done", ended_at=time.time())
        r.phase = "live"
        r.log(f"{r.green} takes {to[-1]:g}% of the traffic")

    async def rollback(self) -> tuple[int, dict[str, Any]]:
        r = self.rollout
        if r is None:
            return 409, {"detail": "no rollout to roll back"}
        live = await self.live_routing()
        if r.green not in live.weights:
            return 409, {"detail": f"{r.green} is no longer live: nothing to roll back"}
        if self.task is not None and not self.task.done():
            self.task.cancel()  # a shift in progress stops before its next step
        await self._rollback("operator")
        return 200, (await self.status())[1]

    async def _rollback(self, reason: str) -> None:
        r = self.rollout
        before = Routing.from_dict(r.blue_routing)
        live = await self.live_routing()
        weights = {**{v: w for v, w in before.weights.items() if v in live.weights}, r.green: 0.0}
        await self._publish(Routing.make(weights, before.table))
        if r.steps and r.steps[-1]["status"] == "running":
            r.steps[-1].update(status="rolled back", ended_at=time.time())
        r.phase = "rolled_back"
        r.log(f"rolled back ({reason}): all traffic on {sorted(v for v, w in weights.items() if w > 0)}")

    # -- retire, shadow --------------------------------------------------------------------------------------------
    async def retire(self, version: str) -> tuple[int, dict[str, Any]]:
        if busy := self._busy():
            return busy
        live = await self.live_routing()
        apps = await asyncio.to_thread(lambda: set(serve.status().applications))
        if version not in live.weights and version_app_name(version) not in apps:
            return 404, {"detail": f"version {version!r} is neither live nor deployed"}
        if live.weights.get(version, 0.0) > 0:
            return 409, {"detail": f"{version} serves {live.shares()[version]:.1%} of the users: shift the traffic "
                                   "away (rollback, or a rollout of another version) first"}
        if version in live.weights:
            rest = {v: w for v, w in live.weights.items() if v != version}
            if not rest or sum(rest.values()) <= 0:
                return 409, {"detail": f"{version} is the last live version"}
            shadow = live.shadow if live.shadow != version else None
            await self._publish(Routing.make(rest, live.table, shadow, live.shadow_share if shadow else 0.0))
            await asyncio.sleep(self.cfg.retire_grace_s)  # requests that chose it before the publish finish
        await asyncio.to_thread(serve.delete, version_app_name(version))
        dropped = await asyncio.to_thread(drop_shards, version)
        if self.rollout is not None and self.rollout.green == version:
            self.rollout.phase = "retired"
            self.rollout.log(f"retired: application deleted, {dropped} index shard actors stopped")
        return 200, {"retired": version, "index_shards_stopped": dropped, **(await self.status())[1]}

    async def shadow(self, version: str, share: float) -> tuple[int, dict[str, Any]]:
        live = await self.live_routing()
        if version not in live.weights:
            return 422, {"detail": [{"loc": ["body", "version"], "type": "value_error",
                                     "msg": f"{version!r} is not live; live versions: {sorted(live.weights)}"}]}
        await self._publish(Routing.make(live.weights, live.table, version if share > 0 else None, share))
        return 200, (await self.status())[1]


def shop_gate_users(shop_dir: str | Path, n: int = 1000) -> list[dict[str, Any]]:
    """A seeded sample of the shop's users with their country and device: the requests that top up the gate's
    recorded ones."""
    import numpy as np

    from training.data.schemas import read_shop

    users = read_shop(shop_dir).users.to_pylist()
    picked = np.random.default_rng(0).choice(len(users), size=min(n, len(users)), replace=False)
    return [{"user_id": users[i]["user_id"], "context": {"country": users[i]["country"], "device": users[i]["device"],
                                                          "page": "home"}} for i in picked]


def start_controller(serving: ServingConfig, index: IndexConfig, cfg: RolloutConfig,
                     sample_users: list[dict[str, Any]] | None = None) -> Any:
    """The cluster's rollout controller: created once (a detached actor without CPU, restarted if it dies, its
    rollout state then lost), given this serving session's configs."""
    actor = ray.remote(RolloutController).options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached",
                                                  get_if_exists=True, num_cpus=0, max_restarts=-1).remote(
        serving, index, cfg, sample_users)
    ray.get(actor.configure.remote(serving, index, cfg, sample_users))
    return actor
