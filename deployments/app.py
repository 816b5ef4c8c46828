"""The one place that wires Serve applications: every `.bind()` lives here."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from ray.serve import Application

from deployments.ingress.routes import Ingress
from deployments.ranking import Ranking
from deployments.retrieval import Retrieval
from deployments.version import Version
from deployments.store import EMBEDDED
from indexing.embed import LAYOUTS


QUIET = {"log_level": "WARNING", "enable_access_log": False}  # replicas' logs still go to the session's log files


@dataclass(frozen=True)
class ServingConfig:
    host: str = "127.0.0.1"  # loopback by default; set 0.0.0.0 to serve a network
    port: int = 8000  # Serve's default HTTP port
    candidates: int = 500  # retrieved per request and ranked
    replica_cpus: float = 0.1  # fractional: a 2-core machine hosts every stage of two versions
    min_replicas: int = 1  # autoscaling floor per deployment; 2 lets a replica die without failing a request
    max_replicas: int = 4  # autoscaling ceiling per deployment
    # Serve's autoscaler waits this long above (below) its target before adding (removing) a replica; Serve's own
    # downscale default (600 s) keeps a load peak's replicas for ten minutes
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0
    threads: int = 1  # torch threads per model replica; scale out with replicas, not threads
    # Where a retrieval replica searches the index (indexing.embed.index_layout): auto holds it in process when it
    # fits index_memory_mb (1M items x 64 float32 is 256 MB), and fans out to the shard actors beyond that.
    index_layout: str = "auto"
    index_memory_mb: float = 1024.0
    request_timeout_s: float = 10.0  # the HTTP proxy answers 408 past this: no request waits forever
    stage_timeout_s: float = 5.0  # each call from the ingress to a stage (retrieval, ranking)
    store_timeout_s: float = 0.5  # the online store; past it the request goes on without the user's state
    # The online store: "embedded" (an in-memory actor, lost on restart) or a redis:// URL (durable; started by
    # `recsys serve --store redis`, see cluster/redis_server.py).
    store: str = EMBEDDED

    def __post_init__(self) -> None:
        if self.index_layout not in LAYOUTS:
            raise ValueError(f"serving.index_layout must be one of {list(LAYOUTS)}, got {self.index_layout!r}")
        if self.store != EMBEDDED and not self.store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"serving.store must be 'embedded' or a redis:// URL, got {self.store!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _autoscaling(cfg: ServingConfig, target: int) -> dict[str, Any]:
    """Each deployment's target is half its `max_ongoing_requests`, so a replica is added well before requests
    queue (a target above the cap could never be reached)."""
    return {"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
            "target_ongoing_requests": target, "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s}


def build_version_app(bundle_dir: str, version: str, cfg: ServingConfig) -> Application:
    """Version (describes the version) -> Retrieval + Ranking, all built from one bundle. The HTTP ingress calls
    Retrieval and Ranking by handle; Version binds them into one application that is deployed and deleted whole."""
    opts = {"ray_actor_options": {"num_cpus": cfg.replica_cpus}}
    retrieval = Retrieval.options(**opts, autoscaling_config=_autoscaling(cfg, 4)).bind(
        bundle_dir, cfg.threads, cfg.index_layout, cfg.index_memory_mb)
    ranking = Ranking.options(**opts, autoscaling_config=_autoscaling(cfg, 8)).bind(bundle_dir, cfg.threads)
    return Version.options(ray_actor_options={"num_cpus": cfg.replica_cpus / 5}).bind(retrieval, ranking, bundle_dir, version)


def ingress_user_config(versions: dict[str, float], policy: dict[str, Any] | None, cfg: ServingConfig,
                        admin_token_sha256: str | None = None, buckets: list[list[Any]] | None = None) -> dict[str, Any]:
    """The Ingress's user_config (see `Ingress.reconfigure`): what changes in place, without restarting it."""
    user_config = {"versions": dict(versions), "policy": dict(policy or {}), "candidates": cfg.candidates,
                   "stage_timeout_s": cfg.stage_timeout_s, "store_timeout_s": cfg.store_timeout_s}
    if admin_token_sha256:
        user_config["admin_token_sha256"] = admin_token_sha256
    if buckets:
        user_config["buckets"] = buckets
    return user_config


def build_ingress_app(versions: dict[str, float], policy: dict[str, Any] | None, cfg: ServingConfig,
                      admin_token_sha256: str | None = None, buckets: list[list[Any]] | None = None) -> Application:
    """The HTTP application: the Ingress, with versions, policy and the candidate count as its user_config.

    `admin_token_sha256` (hex sha256 of the admin bearer token) enables `/admin/policy`; without it the ingress reads
    the token from RECSYS_ADMIN_TOKEN, and with neither the admin endpoint refuses every call. `buckets`, the live
    routing table (runs), makes the new split move users only from versions that shrink to versions that grow.
    """
    user_config = ingress_user_config(versions, policy, cfg, admin_token_sha256, buckets)
    return Ingress.options(ray_actor_options={"num_cpus": cfg.replica_cpus},
                           autoscaling_config=_autoscaling(cfg, 2), user_config=user_config).bind(
        store_spec=cfg.store)
