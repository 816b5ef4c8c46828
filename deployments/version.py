"""The ingress deployment of a version's application (`recsys-<version>`): it describes the version and checks its
stages. It is off the request path: the HTTP ingress reaches the version's `Retrieval` and `Ranking` by handle."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.backpressure import SHED
from indexing.embed import read_index_manifest
from training.fit.bundle import MANIFEST
from training.request.clock import version_clock


@serve.deployment(ray_actor_options={"num_cpus": 0.02}, max_ongoing_requests=8, max_queued_requests=16,
                  backpressure_config=SHED)
class Version:
    """What `/versions` and `/healthz` ask of a version; binds its stages into one application."""

    def __init__(self, retrieval: DeploymentHandle, ranking: DeploymentHandle, bundle_dir: str, version: str,
                 changes: str = "", clock: str = "auto") -> None:
        """`changes`: the catalog change log the version's stages follow (where `POST /admin/items` writes).
        `clock`: `ServingConfig.clock`, resolved against the bundle (`training.request.clock`)."""
        self.retrieval, self.ranking, self.bundle_dir, self.version = retrieval, ranking, bundle_dir, version
        self.changes = changes
        manifest = json.loads((Path(bundle_dir) / MANIFEST).read_text())
        self._clock = version_clock(manifest, clock)
        order = dict((manifest.get("metrics") or {}).get("serving_order") or {})
        self._order = order or {"serve": "ranker", "reason": "the bundle predates the serving-order check"}

    async def clock(self) -> dict[str, Any]:
        """The version's serving clock (`ServingClock.to_dict`): the ingress stamps events and new items with it."""
        return self._clock.to_dict()

    async def info(self) -> dict[str, Any]:
        manifest = read_index_manifest(self.bundle_dir)
        return {"version": self.version, "bundle": self.bundle_dir, "order": self._order,
                "index": {"n_items": manifest["n_items"], "shards": len(manifest["shards"]),
                          "built_at": manifest["built_at"], "index_type": manifest["index_type"]}}

    async def change_log(self) -> str:
        """Where the version's catalog changes go (admin only: a Redis URL may hold a password)."""
        return self.changes

    async def health(self) -> dict[str, Any]:
        retrieval, ranking = await asyncio.gather(self.retrieval.health.remote(), self.ranking.health.remote())
        return {"version": self.version, "retrieval": retrieval, "ranking": ranking}
