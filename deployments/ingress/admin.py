"""Admin steering of the live policy and routing: the registries every ingress replica follows, the admin token
check, and each replica's followers (`PolicySteering`: the policy and its per-surface presets;
`deployments.ingress.routing.RoutingSteering`: the live versions, their weights and buckets, and shadow traffic).

Why a registry. Live versions, weights and the base policy are the ingress's `user_config`; Serve applies a new one
through `reconfigure` on the running replicas (`serve deploy` with a changed `user_config` is a lightweight
update). The admin endpoint `POST /admin/policy` must reach every ingress replica, not only the one that received
it, and a replica cannot call `serve.run` on its own application: an imperative `serve.run` gives the deployment a
new random code version, so Serve replaces (restarts) every replica, including the one waiting for the call to
return. Hence one small named actor, `SteeringRegistry` (`recsys-policy-registry`), holds the current policy and a
version number, and every replica follows it with a long poll (`wait_newer`), which also acknowledges the version it
runs. The admin endpoint validates the config (a bad one gets a 422 naming the field and nothing changes), stores
it, and answers once every live replica has acknowledged it, so the next request on any replica uses it. Requests
in flight keep the (immutable) config they started with: no request fails and no replica restarts. New replicas
read the registry in `reconfigure`, before they take traffic. Precedence: the latest change wins, whether it came
from the admin endpoint or from a `user_config` whose policy differs from the one deployed before. The routing
(versions, weights, buckets, shadow) works the same way through its own registry, `recsys-routing-registry`: a
rollout step or a rollback is one `publish`, effective for the next request on every replica.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from typing import Any, Mapping

import ray
from fastapi import HTTPException

from deployments.calls import ActorCalls
from training import NAMESPACE
from training.request.policy_config import DEFAULT_SURFACES, PolicyConfig

logger = logging.getLogger("ray.serve")
REGISTRY_NAME = "recsys-policy-registry"
ROUTING_REGISTRY_NAME = "recsys-routing-registry"  # the live versions, weights, buckets and shadow
ADMIN_TOKEN_ENV = "RECSYS_ADMIN_TOKEN"  # the admin token itself, in the replicas' environment
POLL_S = 20.0  # a follower re-polls at least this often, which is also its liveness heartbeat
LIVE_S = 2 * POLL_S + 5.0  # a replica silent for longer is presumed gone and not waited for
ACK_TIMEOUT_S = 10.0  # how long the admin endpoint waits for every replica to confirm
OTHER_SURFACE = "other"  # every page without a preset: one cache entry and one metric tag, however many pages exist


def unprocessable(field: list[str], msg: str) -> HTTPException:
    return HTTPException(status_code=422, detail=[{"loc": ["body", *field], "msg": msg, "type": "value_error"}])


class SteeringRegistry:
    """One validated config (the live policy, or the live routing of `deployments.ingress.routing`) and its version,
    followed by every ingress replica; run as a named actor (`recsys-policy-registry`, `recsys-routing-registry`).
    Plain asyncio, so it is unit-tested without Ray."""

    def __init__(self, initial: dict[str, Any] | None = None) -> None:
        self.version, self.value, self.base = 0, dict(initial or {}), None
        self.seen: dict[str, tuple[int, float]] = {}  # replica -> (version it runs, monotonic time last heard)
        self._changed = asyncio.Event()

    def _bump(self, value: dict[str, Any]) -> int:
        self.version, self.value = self.version + 1, value
        self._changed.set()  # wakes every waiting follower; the next wait gets a fresh event
        self._changed = asyncio.Event()
        return self.version

    async def publish_base(self, value: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A replica's `user_config` value: it becomes current only when it differs from the last one published,
        so the N replicas of one deployment (and later autoscaled ones) do not undo an admin change."""
        if value != self.base:
            self.base = value
            self._bump(value)
        return self.version, self.value

    async def set(self, value: dict[str, Any]) -> int:
        """Stores a validated value (an admin change, a rollout step); returns its version."""
        return self._bump(value)

    async def current(self) -> tuple[int, dict[str, Any]]:
        return self.version, self.value

    async def wait_newer(self, replica: str, version: int, timeout_s: float = POLL_S) -> tuple[int, dict[str, Any]]:
        """Records that ``replica`` runs ``version``; returns as soon as a newer one exists (or after timeout_s)."""
        self.seen[replica] = (version, time.monotonic())
        if self.version <= version:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        return self.version, self.value

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


async def publish(registry: Any, value: dict[str, Any],
                  timeout_s: float = ACK_TIMEOUT_S) -> tuple[int, list[str], int]:
    """Stores a validated value in a registry and waits up to `timeout_s` for every live replica to run it:
    (version, replicas still pending, replicas that applied it). `registry`: `ActorCalls` of the actor, or a
    `SteeringRegistry` in process."""
    version = await registry.set(value)
    deadline = time.monotonic() + timeout_s
    pending = await registry.pending(version)
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        pending = await registry.pending(version)
    return version, pending, await registry.applied(version)


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
        raise unprocessable(where, str(e)) from e


def registry_actor(name: str = REGISTRY_NAME, initial: dict[str, Any] | None = None) -> ActorCalls:
    """The cluster's registry actor of that name, created (holding `initial`) by the first replica that asks."""
    # [1] one registry for all replicas; detached so it outlives any replica, no CPU so it always fits
    actor = ray.remote(SteeringRegistry).options(name=name, namespace=NAMESPACE, lifetime="detached",
                                                 get_if_exists=True, num_cpus=0).remote(initial)
    return ActorCalls(actor)


class Follower:
    """One ingress replica's copy of a registry's value: applies every newer version as it appears (a long poll on
    the replica's event loop). Subclasses parse the value in `apply`, once per version, so requests stay cheap."""

    def __init__(self, registry: Any, replica: str) -> None:
        """registry: `ActorCalls` of the registry actor, or a `SteeringRegistry` in process (same async methods)."""
        self.registry, self.replica, self.version = registry, replica, 0
        self._follower: asyncio.Task | None = None

    def apply(self, value: dict[str, Any]) -> None:
        raise NotImplementedError

    def _use(self, version: int, value: dict[str, Any]) -> None:
        if version > self.version:
            self.apply(value)  # stored validated: this does not raise
            self.version = version

    async def publish_base(self, value: dict[str, Any]) -> None:
        """Applies a `user_config` value through the registry and starts following it (on the replica's loop)."""
        self._use(*await self.registry.publish_base(value))
        if self._follower is None:  # [2] started on the replica's event loop, where requests run
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while True:
            try:
                value = await self.registry.wait_newer(self.replica, self.version)
            except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError) as e:
                logger.warning(f"{type(self).__name__}: registry unreachable ({type(e).__name__}); retrying in 1 s")
                await asyncio.sleep(1.0)
                continue
            try:
                self._use(*value)
            except Exception as e:  # noqa: BLE001 - e.g. a version's application not found: keep the last value
                logger.warning(f"{type(self).__name__}: version {value[0]} not applied ({type(e).__name__}: {e}); "
                               "retrying in 1 s")  # not acknowledged either: the publisher sees it pending
                await asyncio.sleep(1.0)

    async def set(self, value: dict[str, Any]) -> tuple[int, list[str], int]:
        """Stores a validated value and waits for every live replica to run it (see `publish`)."""
        return await publish(self.registry, value)

    async def leave(self) -> None:
        """Stops following and leaves the registry, so a change does not wait for a replica that is gone (one that
        dies without it ages out after LIVE_S)."""
        if self._follower is not None:
            self._follower.cancel()
        try:
            await self.registry.leave(self.replica)
        except (ray.exceptions.RayActorError, ray.exceptions.RaySystemError):
            pass  # the registry is gone too: nothing to leave


class PolicySteering(Follower):
    """One ingress replica's live policy: the config it runs and its presets per surface."""

    def __init__(self, registry: Any, replica: str) -> None:
        super().__init__(registry, replica)
        self.policy = PolicyConfig()
        self._by_surface: dict[str, PolicyConfig] = {}

    def surface(self, page: str | None) -> str:
        """The surface a page belongs to: the standard surfaces (home, category, search) and every page with a
        preset name their own, every other page is `OTHER_SURFACE`."""
        return page if page in self.policy.surfaces or page in DEFAULT_SURFACES else OTHER_SURFACE

    def config_for(self, surface: str) -> PolicyConfig:
        config = self._by_surface.get(surface)
        if config is None:
            config = self._by_surface[surface] = self.policy.for_page(surface)
        return config

    def apply(self, value: dict[str, Any]) -> None:
        self.policy, self._by_surface = PolicyConfig.from_dict(value), {}
