"""Version routing: the live versions with their weights, the handles of each version's stages, and the sticky
weighted split of users between versions."""
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
