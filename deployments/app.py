"""The one place that wires Serve applications: every `.bind()` lives here."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ray.serve import Application

from deployments.ingress.admission import INGRESS_MAX_ONGOING
from deployments.ingress.routes import Ingress
from deployments.ranking import RANKING_MAX_ONGOING, Ranking
from deployments.retrieval import RETRIEVAL_MAX_ONGOING, Retrieval
from deployments.version import Version
from deployments.store import EMBEDDED
from indexing.embed import LAYOUTS
from training.request.clock import CLOCKS

CHANGES_FILE = "item-changes.jsonl"
IMPRESSIONS_DIR = "impressions"


QUIET = {"log_level": "WARNING", "enable_access_log": False}  # replicas' logs still go to the session's log files
# By default Serve runs a replica's code on an event loop thread of its own and, in a replica that calls other
# deployments, the handle router on a third; on a 2-core machine every hand-off between them costs milliseconds.
# One loop per replica (and gRPC from the ingress to its stages: `routing.VersionStages`) took POST /recommend from
# p50 46.8 to 39.3 ms at concurrency 1 (docs/architecture.md, "What a hop costs"). These are the replica's
# environment only: a driver or test keeps Serve's defaults, where `.result()` still works inside an event loop.
STAGE_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
             "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1000"}  # request-path logs flushed in batches, errors at once
INGRESS_ENV = {**STAGE_ENV, "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


# each deployment's Serve cap on the requests one replica works on at once
MAX_ONGOING = {"ingress": INGRESS_MAX_ONGOING, "retrieval": RETRIEVAL_MAX_ONGOING, "ranking": RANKING_MAX_ONGOING}
AUTOSCALE_TARGETS = {name: cap / 2 for name, cap in MAX_ONGOING.items()}


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
    one_loop: bool = True  # replicas run their code and their handle router on one event loop (STAGE_ENV)
    # The catalog's change log that every stage replica follows (indexing/changes.py): "auto" is the store's Redis
    # when it is one, else `item-changes.jsonl` in the folder of the shop's bundles; "off" follows none; or a path
    # or a redis:// URL.
    changes: str = "auto"
    # What item and action ages are measured against (training.request.clock): "auto" is the data's own time line
    # for a version trained on a snapshot (the synthetic shop), the wall clock for live data; or "data" / "wall".
    clock: str = "auto"
    # Where every answer's shown items are logged (deployments/ingress/impressions.py): "auto" is the store's Redis
    # when it is one, else the folder `impressions/` of the working directory (shared storage on a multi-node
    # cluster); "off"; or a folder or a redis:// URL.
    impressions: str = "auto"
    # Serve's autoscaling target of each deployment, ongoing requests per replica: a replica is added above it (for
    # `upscale_delay_s`). Half of each one's max_ongoing_requests (4, 8, 16) by default, at most that cap (a target
    # above it can never be reached).
    autoscale_targets: dict = field(default_factory=lambda: dict(AUTOSCALE_TARGETS))

    def __post_init__(self) -> None:
        targets = self.autoscale_targets
        if not isinstance(targets, dict) or set(targets) - set(MAX_ONGOING):
            raise ValueError(f"serving.autoscale_targets: a mapping of {sorted(MAX_ONGOING)} to numbers, got "
                             f"{targets!r}")
        for name, value in targets.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_ONGOING[name]:
                raise ValueError(f"serving.autoscale_targets.{name}: a number in (0, {MAX_ONGOING[name]}] (its "
                                 f"max_ongoing_requests), got {value!r}")
        object.__setattr__(self, "autoscale_targets", {**AUTOSCALE_TARGETS, **targets})
        if self.clock not in CLOCKS:
            raise ValueError(f"serving.clock must be one of {list(CLOCKS)}, got {self.clock!r}")
        if self.index_layout not in LAYOUTS:
            raise ValueError(f"serving.index_layout must be one of {list(LAYOUTS)}, got {self.index_layout!r}")
        if self.store != EMBEDDED and not self.store.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"serving.store must be 'embedded' or a redis:// URL, got {self.store!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def change_log_spec(cfg: ServingConfig, bundle_dir: str | Path) -> str:
    """The change log of a bundle's stages ("" for none): see `ServingConfig.changes`."""
    if cfg.changes == "off":
        return ""
    if cfg.changes != "auto":
        return cfg.changes
    if cfg.store != EMBEDDED:
        return cfg.store
    return str(Path(bundle_dir).resolve().parent / CHANGES_FILE)


def impression_log_spec(cfg: ServingConfig) -> str:
    """The ingress's impression log ("" for none): see `ServingConfig.impressions`."""
    if cfg.impressions == "off":
        return ""
    if cfg.impressions != "auto":
        return cfg.impressions
    return cfg.store if cfg.store != EMBEDDED else str(Path(IMPRESSIONS_DIR).resolve())


def _actor_options(cfg: ServingConfig, env: dict[str, str], share: float = 1.0) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cpus": cfg.replica_cpus * share}
    if cfg.one_loop:
        options["runtime_env"] = {"env_vars": dict(env)}  # Serve merges it with the job's runtime_env
    return options


def _autoscaling(cfg: ServingConfig, deployment: str) -> dict[str, Any]:
    """A deployment's autoscaling: its target from `cfg.autoscale_targets` (by default half its
    `max_ongoing_requests`, so a replica is added well before requests queue)."""
    return {"min_replicas": cfg.min_replicas, "max_replicas": max(cfg.max_replicas, cfg.min_replicas),
            "target_ongoing_requests": cfg.autoscale_targets[deployment], "upscale_delay_s": cfg.upscale_delay_s,
            "downscale_delay_s": cfg.downscale_delay_s}


def build_version_app(bundle_dir: str, version: str, cfg: ServingConfig) -> Application:
    """Version (describes the version) -> Retrieval + Ranking, all built from one bundle. The HTTP ingress calls
    Retrieval and Ranking by handle; Version binds them into one application that is deployed and deleted whole."""
    opts = {"ray_actor_options": _actor_options(cfg, STAGE_ENV)}
    changes = change_log_spec(cfg, bundle_dir)
    retrieval = Retrieval.options(**opts, autoscaling_config=_autoscaling(cfg, "retrieval")).bind(
        bundle_dir, cfg.threads, cfg.index_layout, cfg.index_memory_mb, changes=changes, clock=cfg.clock)
    ranking = Ranking.options(**opts, autoscaling_config=_autoscaling(cfg, "ranking")).bind(
        bundle_dir, cfg.threads, changes=changes)
    return Version.options(ray_actor_options=_actor_options(cfg, STAGE_ENV, 1 / 5)).bind(
        retrieval, ranking, bundle_dir, version, changes, clock=cfg.clock)


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
    return Ingress.options(ray_actor_options=_actor_options(cfg, INGRESS_ENV),
                           autoscaling_config=_autoscaling(cfg, "ingress"), user_config=user_config).bind(
        store_spec=cfg.store, impressions=impression_log_spec(cfg))
