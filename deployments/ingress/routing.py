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
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Mapping

from ray import serve
from ray.serve.handle import DeploymentHandle


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


BUCKETS = 1000  # a weight's resolution is 0.1%


def bucket_of(user_id: str) -> int:
    return zlib.crc32(user_id.encode()) % BUCKETS


def bucket_counts(weights: Mapping[str, float]) -> dict[str, int]:
    """Buckets per version, proportional to the weights (largest remainder; ties to the earlier-named version)."""
    total = sum(weights.values())
    exact = {v: BUCKETS * w / total for v, w in weights.items()}
    counts = {v: int(x) for v, x in exact.items()}
    by_remainder = sorted(weights, key=lambda v: (-(exact[v] - counts[v]), v))
    for v in by_remainder[:BUCKETS - sum(counts.values())]:
        counts[v] += 1
    return counts


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
        return cls(serve.get_deployment_handle("Retrieval", app), serve.get_deployment_handle("Ranking", app),
                   serve.get_app_handle(app))
