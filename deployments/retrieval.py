"""The retrieval stage of a version: the request-time core (`training.request.retrieval.RetrievalCore`) and the
fan-out to the version's index shards, one search call per shard for all of a request's queries."""
from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import torch
from ray import serve
from ray.serve import metrics

from deployments.backpressure import SHED
from deployments.calls import ActorCalls, LocalCalls
from deployments.changes import ChangeFollowing
from indexing.changes import open_change_log
from indexing.embed import get_shards, has_index_manifest, index_layout, load_shards, read_index_manifest
from indexing.live import Follower
from indexing.shards import merge_top_k, pack_allowed
from training.fit.bundle import load_bundle
from training.request.clock import version_clock
from training.request.contracts import Candidates, RetrievalRequest
from training.request.retrieval import RetrievalCore

logger = logging.getLogger("ray.serve")
SHARD_TIMEOUT_S = 2.0  # a shard slower than this is left out of the answer (marked partial), never waited for
INDEX_WATCH_S = 2.0  # how often a replica looks for a rebuilt index of its version
RETRIEVAL_MAX_ONGOING = 8  # requests one replica works on at once (Serve's cap)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=RETRIEVAL_MAX_ONGOING,
                  max_queued_requests=16,
                  backpressure_config=SHED,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4})
class Retrieval:
    """User queries at request time, fan-out to every index shard of the version, one merge to the candidates."""

    def __init__(self, bundle_dir: str, threads: int = 1, layout: str = "auto", memory_mb: float = 1024.0,
                 shards: Sequence[Any] | None = None, changes: str = "", clock: str = "auto") -> None:
        """Args:
            layout, memory_mb: where the index is searched (`indexing.embed.index_layout`): in this replica's own
                memory when the whole index fits `memory_mb` (one hop fewer per request), else on the shard actors.
            shards: the shards as `search`/`stats` coroutines, overriding the layout (Serve's local testing mode).
            changes: the catalog's change log (`indexing.changes.open_change_log`) this replica follows into its
                forward index and the index shards; "" follows none.
            clock: `ServingConfig.clock`: the time line action ages are measured on (`training.request.clock`).
        """
        torch.set_num_threads(threads)  # [1] replicas share cores: one intra-op thread each, scale out by replicas
        bundle = load_bundle(bundle_dir)
        self.version = bundle.version
        self.clock = version_clock(bundle.manifest, clock)
        self.core = RetrievalCore.from_bundle(bundle)  # [2] the algorithm is chosen here, once per bundle
        self.layout = "given"
        manifest = read_index_manifest(bundle_dir) if shards is None or has_index_manifest(bundle_dir) else None
        self.index_version = manifest.get("version", bundle.version) if manifest else bundle.version
        if self.index_version != bundle.version:  # a version's answers come from its own index, never another's
            raise ValueError(f"{bundle_dir}: the index was built for {self.index_version!r}, the bundle is "
                             f"{bundle.version!r}; rebuild it with `recsys index --bundle {bundle_dir}`")
        if shards is None:
            self.layout = index_layout(manifest, layout, memory_mb)
            if self.layout == "in_process":  # [3] the vectors pass through memory, not a network call
                shards = [LocalCalls(s) for s in load_shards(bundle_dir, manifest)]
            else:
                shards = [ActorCalls(s) for s in get_shards(manifest)]
        self.shards = list(shards)
        # [6] a rebuilt index is switched to when its manifest replaces this one (indexing.embed.embed_catalog)
        self.bundle_dir, self.layout_setting = bundle_dir, (layout, memory_mb)
        self.build = manifest.get("build") if manifest and self.layout != "given" else None
        self._index_watch: asyncio.Task | None = None
        self.changes = None
        if changes:  # [5] new items, attribute changes and deletions, applied without a rebuild
            follower = Follower(open_change_log(changes), self.core.forward, self.core.item_vectors,
                                len(self.shards), self.core.applied)
            self.changes = ChangeFollowing(follower, self.shards, self.version, "retrieval")
        # the user-query cache's hit rate per version, for the dashboard (a hit skips the user tower)
        self.cache_lookups = metrics.Counter("recsys_query_cache_lookups", "User-query cache lookups by result.",
                                             tag_keys=("model_version", "result"))
        n_items = manifest["n_items"] if manifest else None
        if n_items is not None:  # the index's size per version, for the dashboard
            metrics.Gauge("recsys_index_items", "Items in the version's index.", tag_keys=("model_version",)).set(
                n_items, {"model_version": self.version})

    async def search(self, xq: np.ndarray, k: int,
                     allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
        """(nq, D) queries -> scores and item indices (nq, k) over every shard that answers within
        SHARD_TIMEOUT_S, -1 where fewer than k exist, and whether a shard was missing; `allowed` (a bool mask over
        item indices) filters inside each shard's search. With no shard answering, the error is raised."""
        packed = None if allowed is None else pack_allowed(allowed)
        parts = await asyncio.gather(*[asyncio.wait_for(s.search(xq, k, packed), SHARD_TIMEOUT_S)
                                       for s in self.shards], return_exceptions=True)  # [4] fan out to all shards
        ok = [p for p in parts if not isinstance(p, BaseException)]
        if not ok:
            raise next(p for p in parts if isinstance(p, BaseException))
        if len(ok) < len(parts):
            logger.warning(f"{self.version}: {len(parts) - len(ok)} of {len(parts)} index shards did not answer; "
                           "serving the others' candidates")
        D, I = merge_top_k([p[0] for p in ok], [p[1] for p in ok], k)
        return D, I, len(ok) < len(parts)

    def _ensure_background(self) -> None:
        """Starts following the change log and watching the index manifest, on the running loop (once)."""
        if self.changes is not None:
            self.changes.ensure_started()
        if self.build is not None and (self._index_watch is None or self._index_watch.done()):
            self._index_watch = asyncio.get_running_loop().create_task(self._watch_index())

    async def _watch_index(self) -> None:
        while True:
            await asyncio.sleep(INDEX_WATCH_S)
            try:
                await self.switch_index()
            except Exception as e:  # noqa: BLE001 - the serving build goes on; the next look tries again
                logger.warning(f"{self.version}: switching to the rebuilt index failed: {e!r}")

    async def switch_index(self) -> bool:
        """Switches to the index build the manifest names, when it is not this replica's: loads it (in process) or
        finds its shard actors, brings it to the change log's offset, then serves from it; the old build answers
        every request until then. True when it switched."""
        manifest = await asyncio.to_thread(read_index_manifest, self.bundle_dir)
        if manifest.get("build") in (None, self.build) or manifest.get("version") != self.version:
            return False
        layout = index_layout(manifest, *self.layout_setting)
        if layout == "in_process":
            shards = [LocalCalls(s) for s in await asyncio.to_thread(load_shards, self.bundle_dir, manifest)]
        else:
            shards = [ActorCalls(s) for s in get_shards(manifest)]
        if self.changes is not None:  # the new build holds the bundle's catalog: replay the changes since
            follower = self.changes.follower
            follower.n_shards = len(shards)
            for i, shard in enumerate(shards):
                catch_up = follower.catch_up(0, i)
                if catch_up is not None:
                    await shard.apply_changes(catch_up)
            self.changes.shards = shards
        self.shards, self.layout, self.build = shards, layout, manifest["build"]
        logger.warning(f"{self.version}: now serving index build {self.build} ({layout}, {manifest['n_items']} items)")
        return True

    async def retrieve(self, req: RetrievalRequest) -> Candidates:
        self._ensure_background()
        now = self.clock.now()
        features = self.core.encode(req, now)
        allowed = self.core.allowed(req)
        hits, misses = self.core.cache.hits, self.core.cache.misses
        q = self.core.queries(features)
        if self.core.cache.hits > hits or self.core.cache.misses > misses:  # a cold start looks nothing up
            self.cache_lookups.inc(1, {"model_version": self.version,
                                       "result": "hit" if self.core.cache.hits > hits else "miss"})
        if q is None:
            return self._stamped(self.core.cold_start(features, req.k, allowed), now=now)
        D, I, partial = await self.search(q.xq, req.k, allowed)
        found = self.core.merge(features, q, D, I, req.k)
        return self._stamped(found, partial, now)

    def _stamped(self, found: Candidates, partial: bool = False, now: float = 0.0) -> Candidates:
        """The answer marked with the versions of the tower and the index that produced it, and the clock's now."""
        return dataclasses.replace(found, partial=partial or found.partial, version=self.version,
                                   index_version=self.index_version, now=now)

    async def check_health(self) -> None:
        """Serve replaces a replica whose index is unusable: in process, shards that lost vectors; sharded, no shard
        answering (one shard down still serves partial answers, and Ray restarts the shard actor)."""
        stats = await asyncio.gather(*[asyncio.wait_for(s.stats(), SHARD_TIMEOUT_S) for s in self.shards],
                                     return_exceptions=True)
        if all(isinstance(s, BaseException) for s in stats):
            raise RuntimeError(f"{self.version}: no index shard answers: {stats[0]!r}")
        if self.layout == "in_process" and any(s["ntotal"] == 0 for s in stats):
            raise RuntimeError(f"{self.version}: an in-process shard holds no vectors")
        self._ensure_background()
        if self.changes is not None:
            if self.layout == "sharded":  # a shard actor that restarted from its file missed the changes since
                await self.changes.check_shards()

    async def health(self) -> dict[str, Any]:
        self._ensure_background()
        stats = await asyncio.gather(*[s.stats() for s in self.shards])
        return {"version": self.version, "layout": self.layout, "build": self.build, "shards": len(stats),
                "items": sum(s["ntotal"] for s in stats),
                "shard_changes_offsets": [s.get("changes_offset", 0) for s in stats],
                "changes": self.changes.stats() if self.changes is not None else None, **self.core.stats()}
