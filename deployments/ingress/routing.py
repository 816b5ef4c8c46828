"""Version routing: the live versions with their weights, the handles of each version's stages, and the sticky
weighted split of users between versions.

The split. A user's bucket is crc32(user_id) mod BUCKETS, for ever; each version owns a set of buckets in
proportion to its weight (the routing table, BUCKETS version names). A new table is made from the previous one and
the new weights (`assign_buckets`): a version keeps the buckets it owns up to its new count, releases the rest, and
the released buckets go to the versions below their count. So a re-weighting moves users only from versions that
shrink to versions that grow, however many versions are live; a version whose share stays keeps every one of its
users. A split cannot be sticky in that sense as a function of the weights alone (three versions at 50% in turn
would need three disjoint halves), so the table is state: the ingress's `user_config` carries it (`buckets`, run
length encoded), and `cluster.serving.deploy_ingress` reads the live one before it deploys the next.

The live routing (`Routing`: weights, table, shadow traffic) reaches every replica through the routing registry
(`deployments.ingress.admin`): a `user_config` publishes its base, a rollout step (`deployments.rollout`) publishes
the next one, and each replica's `RoutingSteering` swaps in the new `LiveRouting` at once. A request reads it once
when it starts, so its version, and that version's stages, never change under it.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.ingress.admin import Follower


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a version names an application and its shards


def check_version_name(version: Any, where: str = "version") -> str:
    if not isinstance(version, str) or not VERSION_NAME.fullmatch(version):
        raise ValueError(f"{where}: a version name is 1-64 letters, digits, '_', '.', '-' (starting with a letter or "
                         f"digit), got {version!r}")
    return version


def version_app_name(version: str) -> str:
    return f"recsys-{version}"


def parse_weights(versions: Mapping[str, Any]) -> dict[str, float]:
    """{"v1": 90, "v2": 10} -> weights; negative, non-numeric or all-zero weights raise ValueError."""
    if not versions:
        raise ValueError("versions: at least one live version is required")
    weights = {}
    for name, w in versions.items():
        check_version_name(name, f"versions.{name}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"versions.{name}: weight must be a number >= 0, got {w!r}")
        weights[str(name)] = float(w)
    if sum(weights.values()) <= 0:
        raise ValueError("versions: weights sum to 0; at least one version must take traffic")
    return weights


BUCKETS = 1000  # a weight's resolution is 0.1%


def bucket_of(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % BUCKETS


def _largest_remainder(exact: Mapping[str, float], total: int) -> dict[str, int]:
    """Integers summing to `total`, each the floor of its exact share or one more (largest remainders first; ties
    to the earlier-named version)."""
    counts = {v: int(x) for v, x in exact.items()}
    by_remainder = sorted(exact, key=lambda v: (-(exact[v] - counts[v]), v))
    for v in by_remainder[:total - sum(counts.values())]:
        counts[v] += 1
    return counts


def bucket_counts(weights: Mapping[str, float]) -> dict[str, int]:
    """Buckets per version, proportional to the weights (largest remainder; ties to the earlier-named version)."""
    total = sum(weights.values())
    return _largest_remainder({v: BUCKETS * w / total for v, w in weights.items()}, BUCKETS)


def assign_buckets(weights: Mapping[str, float], previous: list[str] | None = None) -> list[str]:
    """The routing table for `weights`, moving as few buckets from `previous` as the change requires: each version
    keeps its lowest-numbered buckets up to its new count, and the freed buckets go, in order, to the versions below
    their count (in name order)."""
    counts = bucket_counts(weights)
    table: list[str | None] = [None] * BUCKETS
    held = dict.fromkeys(counts, 0)
    for b, owner in enumerate(previous or ()):
        if owner in counts and held[owner] < counts[owner]:
            table[b], held[owner] = owner, held[owner] + 1
    wanting = iter([v for v in sorted(counts) for _ in range(counts[v] - held[v])])
    return [owner if owner is not None else next(wanting) for owner in table]


def encode_table(table: list[str]) -> list[list[Any]]:
    """[[version, first bucket, last bucket + 1], ...]: the table as runs, for the user_config."""
    runs: list[list[Any]] = []
    for b, owner in enumerate(table):
        if runs and runs[-1][0] == owner:
            runs[-1][2] = b + 1
        else:
            runs.append([owner, b, b + 1])
    return runs


def decode_table(runs: Any) -> list[str]:
    """The inverse of `encode_table`; anything but runs that cover 0..BUCKETS exactly raises ValueError."""
    table: list[str] = []
    try:
        for owner, start, end in runs:
            if not isinstance(owner, str) or start != len(table) or not start < end <= BUCKETS:
                raise ValueError
            table += [owner] * (end - start)
    except (TypeError, ValueError):
        raise ValueError(f"ingress user_config.buckets: runs [version, start, end) covering 0..{BUCKETS}, in order")
    if len(table) != BUCKETS:
        raise ValueError(f"ingress user_config.buckets: runs cover {len(table)} of {BUCKETS} buckets")
    return table


def choose_version(user_id: str, table: list[str]) -> str:
    """Sticky weighted split: the version that owns the user's bucket."""
    return table[bucket_of(user_id)]


def shifted_weights(weights: Mapping[str, float], green: str, percent: float,
                    table: Sequence[str] | None = None) -> dict[str, float]:
    """`green` at `percent` of the traffic, every other version keeping its share of the rest: a rollout step. The
    other versions only shrink and green only grows, so `assign_buckets` moves users only from them to green.

    With the current bucket `table`, the weights are whole buckets: each other version keeps its share of the buckets
    it holds now, rounded so it never gains one. (Weights rounded afresh could: a version at 78.5 buckets of a
    smaller rest may round up from the 78 it held, and take a bucket from another blue version.)
    """
    if not 0 <= percent <= 100:
        raise ValueError(f"percent: between 0 and 100, got {percent!r}")
    others = {v: w for v, w in weights.items() if v != green}
    total = sum(others.values())
    if total <= 0 and percent < 100:
        raise ValueError(f"no version but {green} takes traffic: it cannot be shifted below 100%")
    out = {v: w * (100.0 - percent) / total for v, w in others.items()} if total > 0 else dict.fromkeys(others, 0.0)
    out[green] = float(percent)
    held = {v: sum(1 for owner in table or () if owner == v) for v in others}
    if table is None or sum(held.values()) == 0:
        return out
    green_n = round(percent * BUCKETS / 100.0)
    rest = BUCKETS - green_n
    if rest > sum(held.values()):  # green shrinks: the others grow back, by their weights
        return out
    counts = _largest_remainder({v: n * rest / sum(held.values()) for v, n in held.items()}, rest)
    per_bucket = 100.0 / BUCKETS
    return {v: n * per_bucket for v, n in counts.items()} | {green: green_n * per_bucket}


@dataclass(frozen=True)
class Routing:
    """The live split: weights (a version at weight 0 is live, reachable by a forced `version` and by shadow
    traffic, but owns no bucket), the bucket table, and the shadow traffic (a share of requests also answered by
    `shadow`, the answers never returned)."""

    weights: dict[str, float]
    table: tuple[str, ...]
    shadow: str | None = None
    shadow_share: float = 0.0

    @classmethod
    def make(cls, weights: Mapping[str, Any], previous: list[str] | tuple[str, ...] | None = None,
             shadow: str | None = None, shadow_share: float = 0.0) -> "Routing":
        weights = parse_weights(weights)
        if shadow is not None and shadow not in weights:
            raise ValueError(f"shadow.version: {shadow!r} is not live; live versions: {sorted(weights)}")
        if isinstance(shadow_share, bool) or not isinstance(shadow_share, (int, float)) or not 0 <= shadow_share <= 1:
            raise ValueError(f"shadow.share: a fraction between 0 and 1, got {shadow_share!r}")
        return cls(weights, tuple(assign_buckets(weights, list(previous) if previous else None)),
                   shadow if shadow_share > 0 else None, float(shadow_share) if shadow is not None else 0.0)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Routing":
        """{"versions": {...}, "buckets": runs or absent, "shadow": {"version", "share"} or absent}; the table is
        re-derived from the buckets and the weights, so a stale table is repaired, never trusted."""
        unknown = set(d) - {"versions", "buckets", "shadow"}
        if unknown:
            raise ValueError(f"routing: unknown keys {sorted(unknown)}")
        previous = decode_table(d["buckets"]) if d.get("buckets") else None
        shadow = d.get("shadow") or {}
        if not isinstance(shadow, Mapping) or set(shadow) - {"version", "share"}:
            raise ValueError("shadow: {\"version\": <live version>, \"share\": <fraction>}")
        return cls.make(d.get("versions", {}), previous, shadow.get("version"), shadow.get("share", 0.0))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"versions": dict(self.weights), "buckets": encode_table(list(self.table))}
        if self.shadow is not None:
            out["shadow"] = {"version": self.shadow, "share": self.shadow_share}
        return out

    def shares(self) -> dict[str, float]:
        """The share of users (buckets) each version serves."""
        counts = dict.fromkeys(self.weights, 0)
        for owner in self.table:
            counts[owner] += 1
        return {v: n / BUCKETS for v, n in counts.items()}


@dataclass(frozen=True)
class VersionStages:
    """The handles of one live version's deployments: its two request-path stages and its describing ingress."""

    retrieval: DeploymentHandle
    ranking: DeploymentHandle
    version: DeploymentHandle

    @classmethod
    def of(cls, version: str) -> "VersionStages":
        """The stages of the application `recsys-<version>` (deployments named by their classes)."""
        app = version_app_name(version)
        # By value over the replicas' own gRPC servers rather than as Ray actor calls: a little less work per call
        # (`_by_reference` is the pinned Ray's handle option for it; a dead replica still raises
        # ActorUnavailableError, which the request path retries on another).
        stage = {"_by_reference": False}
        return cls(serve.get_deployment_handle("Retrieval", app).options(**stage),
                   serve.get_deployment_handle("Ranking", app).options(**stage), serve.get_app_handle(app))


@dataclass(frozen=True)
class LiveRouting:
    """What a request reads once when it starts: the routing and the stages of every live version."""

    routing: Routing
    stages: dict[str, VersionStages] = field(default_factory=dict)

    def choose(self, user_id: str) -> str:
        return self.routing.table[bucket_of(user_id)]


class RoutingSteering(Follower):
    """One ingress replica's live routing, following the routing registry: each new value becomes a new
    `LiveRouting`, swapped in whole (requests in flight keep the one they read)."""

    def __init__(self, registry: Any, replica: str, fixed_stages: Mapping[str, VersionStages] | None = None) -> None:
        """fixed_stages: in-process stages by version (Serve's local testing mode); others are looked up by handle."""
        super().__init__(registry, replica)
        self.fixed_stages = dict(fixed_stages or {})
        self.live: LiveRouting | None = None

    def apply(self, value: dict[str, Any]) -> None:
        routing = Routing.from_dict(value)
        known = self.live.stages if self.live else {}
        stages = {v: known.get(v) or self.fixed_stages.get(v) or VersionStages.of(v) for v in routing.weights}
        self.live = LiveRouting(routing, stages)
