"""The ranking stage of a version: the request-time core (`training.request.ranking.RankingCore`) behind
`@serve.batch`, so concurrent requests share one forward pass."""
from __future__ import annotations

from typing import Any

import torch
from ray import serve

from deployments.backpressure import SHED
from deployments.changes import ChangeFollowing
from indexing.changes import open_change_log
from indexing.live import Follower
from training.fit.bundle import load_bundle
from training.request.contracts import RankedList, RankRequest
from training.request.ranking import RankingCore


RANKING_MAX_ONGOING = 16  # requests one replica works on at once (Serve's cap)


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=RANKING_MAX_ONGOING,
                  max_queued_requests=32,
                  backpressure_config=SHED,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Ranking:
    """Multi-task ranker; with `batching`, concurrent requests are scored together in one forward pass.

    `batching=False` scores each request on its own: the baseline of the `@serve.batch` throughput benchmark
    (`bench/ranking.py`); serving always keeps the default.
    """

    def __init__(self, bundle_dir: str, threads: int = 1, batching: bool = True, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.0, changes: str = "") -> None:
        """`changes`: the catalog's change log this replica follows into the attributes its lists carry ("" none)."""
        torch.set_num_threads(threads)  # [1] a fixed intra-op pool: replicas share cores, so 1 avoids oversubscription
        bundle = load_bundle(bundle_dir)
        self.version = bundle.version
        self.core = RankingCore.from_bundle(bundle)
        self.changes = ChangeFollowing(Follower(open_change_log(changes), self.core.forward), [], self.version,
                                       "ranking") if changes else None
        self.batching = batching
        self._rank_batch.set_max_batch_size(max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def rank(self, request: RankRequest) -> RankedList:
        if self.changes is not None:
            self.changes.ensure_started()
        if request.candidates.version and request.candidates.version != self.version:  # never mix two versions
            raise ValueError(f"ranking {self.version}: candidates of version {request.candidates.version!r}")
        ranked = await self._rank_batch(request) if self.batching else self.core.rank([request])[0]
        ranked.version = self.version
        return ranked

    # [2] Requests that queue while a pass runs share the next one. No added wait: at concurrency 1 a 2 ms window
    # cost every request 2 ms (measured over HTTP), while under load the queue fills the batches by itself.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _rank_batch(self, requests: list[RankRequest]) -> list[RankedList]:
        return self.core.rank(requests)

    async def check_health(self) -> None:
        if self.changes is not None:  # follows the log from the start, before the first request
            self.changes.ensure_started()

    async def health(self) -> dict[str, Any]:
        return {"version": self.version, "tasks": list(self.core.model.config.task_weights),
                "batching": self.batching, "changes": self.changes.stats() if self.changes is not None else None}
