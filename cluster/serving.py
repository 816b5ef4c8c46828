"""Serving operations: start Serve, deploy a version's application, (re)deploy the ingress with new weights."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from ray import serve

from deployments.app import QUIET, ServingConfig, build_ingress_app, build_version_app, ingress_user_config
from deployments.ingress.routing import version_app_name
from deployments.redis_store import RedisActions
from deployments.rollout.controller import shop_gate_users, start_controller
from deployments.rollout.gate import RolloutConfig
from deployments.store import EMBEDDED, create_store
from indexing.embed import IndexConfig
from training.fit.bundle import load_bundle
from training.data.schemas import read_shop, snapshot_id

INGRESS_APP = "recsys"


def start_serve(cfg: ServingConfig) -> None:
    """Serve's HTTP proxy on every node, or on the head only when every node shares one address (several nodes on
    one machine, `cluster/local_cluster.py`: their proxies would all bind the same port)."""
    import ray

    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    location = "EveryNode" if len(addresses) > 1 else "HeadOnly"
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
                              "location": location}, logging_config=QUIET)


def deploy_version(bundle_dir: str | Path, cfg: ServingConfig) -> str:
    """Deploys (or updates) the application `recsys-<version>` of a bundle whose index is built; returns the version."""
    bundle_dir = str(Path(bundle_dir).resolve())
    version = load_bundle(bundle_dir).version
    serve.run(build_version_app(bundle_dir, version, cfg), name=version_app_name(version), route_prefix=None,
              logging_config=QUIET)
    return version


def deploy_ingress(versions: dict[str, float], policy: dict[str, Any] | None, cfg: ServingConfig,
                   admin_token_sha256: str | None = None) -> None:
    """Deploys the HTTP application, or applies new weights/policy to it.

    `serve.run` from Python gives the code a new version each call, so Serve rolls the ingress replicas (new ones
    start before old ones stop: no request fails); live policy changes that must not roll anything go through the
    admin endpoint instead (see `deployments.ingress`).
    """
    serve.run(build_ingress_app(versions, policy, cfg, admin_token_sha256, live_routing_table()), name=INGRESS_APP,
              route_prefix="/", logging_config=QUIET)


def serve_config(bundles: dict[str, str | Path], versions: dict[str, float], policy: dict[str, Any] | None,
                 cfg: ServingConfig, admin_token_sha256: str | None = None, shop_dir: str | Path | None = None,
                 index: IndexConfig | None = None, rollout: RolloutConfig | None = None) -> dict[str, Any]:
    """The Serve config file (`serve deploy`, a KubeRay RayService's `serveConfigV2`) of this deployment: one
    application per version and the HTTP ingress, through the typed builders of `deployments.builders`. The
    ingress's versions and policy are its `user_config`: edited in the file, they apply in place. With `shop_dir`,
    the ingress's builder also starts the rollout controller (with `index` and `rollout`, the defaults if None),
    as `recsys serve` does."""
    serving = {k: v for k, v in cfg.to_dict().items() if k not in ("host", "port")}
    apps: list[dict[str, Any]] = [
        {"name": version_app_name(v), "route_prefix": None, "import_path": "deployments.builders:version_app",
         "args": {"version": v, "bundle": str(Path(b).resolve()), "serving": serving}} for v, b in bundles.items()]
    ingress_args = {"versions": dict(versions), "policy": dict(policy or {}), "serving": serving}
    if admin_token_sha256:
        ingress_args["admin_token_sha256"] = admin_token_sha256
    if shop_dir is not None:
        ingress_args.update(shop_dir=str(Path(shop_dir).resolve()), index=(index or IndexConfig()).to_dict(),
                            rollout=(rollout or RolloutConfig()).to_dict())
    user_config = ingress_user_config(versions, policy, cfg, admin_token_sha256)  # the builder's own
    apps.append({"name": INGRESS_APP, "route_prefix": "/", "import_path": "deployments.builders:ingress_app",
                 "args": ingress_args, "deployments": [{"name": "Ingress", "user_config": user_config}]})
    config = {"proxy_location": "EveryNode",
              "http_options": {"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s},
              "logging_config": dict(QUIET), "applications": apps}
    return json.loads(json.dumps(config))  # plain data, no shared objects (YAML would write them as anchors)


def live_routing_table() -> list[list[Any]] | None:
    """The running ingress's routing table (runs), or None when no ingress runs: a new split is made from it, so a
    re-weighting moves only the users it must (deployments.ingress.routing)."""
    if INGRESS_APP not in serve.status().applications:
        return None
    try:
        return serve.get_app_handle(INGRESS_APP).routing_table.remote().result(timeout_s=30)
    except Exception as e:  # noqa: BLE001 - an ingress that cannot answer: the split starts afresh, said aloud
        logging.getLogger(__name__).warning(f"the live routing table could not be read ({type(e).__name__}: {e}); "
                                            "the new split is made without it, so some users may change version")
        return None


def start_rollout(serving: ServingConfig, index: IndexConfig, rollout: RolloutConfig, shop_dir: str | Path,
                  gate_users: int = 1000) -> None:
    """Starts (or re-configures) the rollout controller that `/admin/rollout/*` and `recsys rollout` drive; the
    shop's users (a seeded sample, with their country and device) top up the gate's recorded requests."""
    start_controller(serving, index, rollout, shop_gate_users(shop_dir, gate_users))


def seed_online_store(shop_dir: str | Path, store: str = EMBEDDED) -> dict[str, Any]:
    """Loads the shop's event history into the online store: the embedded actor (created here), or a Redis database
    (once per shop snapshot: a restart keeps the events posted since). Returns the store's stats."""
    import asyncio

    import ray

    if store == EMBEDDED:
        return ray.get(create_store(str(Path(shop_dir).resolve())).stats.remote())
    events = read_shop(shop_dir).events

    async def seed() -> dict[str, Any]:
        redis = RedisActions(store)
        try:
            await redis.seed(events, snapshot_id(shop_dir))
            return await redis.stats()
        finally:
            await redis.close()
    return asyncio.run(seed())


def start_redis(url: str, data_dir: str | Path) -> None:
    """Starts the project's redis-server (append-only persistence) for a loopback URL unless one answers there."""
    from urllib.parse import urlparse

    from cluster import redis_server

    parsed = urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost"):
        return  # a remote Redis is the operator's to run
    redis_server.start(parsed.port or redis_server.DEFAULT_PORT, data_dir)


def wait_healthy(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Polls GET /healthz until every stage answers; raises TimeoutError with the last answer."""
    deadline, last = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/healthz", timeout=10.0)
            last = r.text
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError as e:
            last = repr(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/healthz not healthy after {timeout_s:.0f}s; last answer: {last}")
