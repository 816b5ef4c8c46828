"""The ranking stage of a version: the multi-task ranker, batching concurrent requests into one forward pass."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray import serve

from training.bundle import load_bundle
from training.features import USER_INPUTS
from training.ranker import MultiTaskRanker, score_candidates


def rank_requests(model: MultiTaskRanker, requests: list[dict[str, Any]]) -> list[np.ndarray]:
    """Scores several requests in one pass: each {"features": {USER_INPUTS arrays of one row}, "item_idx": (n,)}."""
    for r in requests:
        missing = [k for k in USER_INPUTS if k not in r.get("features", {})]
        if missing or "item_idx" not in r:
            raise ValueError(f"rank request needs features {list(USER_INPUTS)} and item_idx; missing "
                             f"{missing or ['item_idx']}")
    stacked = [np.concatenate([r["features"][k] for r in requests]) for k in USER_INPUTS]  # (B, L) x3, (B, C)
    return score_candidates(model, *stacked, [np.asarray(r["item_idx"]) for r in requests])


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Ranking:
    """Multi-task ranker; with `batching`, concurrent requests are scored together in one forward pass.

    `batching=False` scores each request on its own: the baseline of the `@serve.batch` throughput benchmark
    (`bench/ranking.py`); serving always keeps the default.
    """

    def __init__(self, bundle_dir: str, threads: int = 1, batching: bool = True, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.002) -> None:
        torch.set_num_threads(threads)  # [1] a fixed intra-op pool: replicas share cores, so 1 avoids oversubscription
        self.model = load_bundle(bundle_dir).ranker()
        self.batching = batching
        self._rank_batch.set_max_batch_size(max_batch_size)
        self._rank_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def rank(self, request: dict[str, Any]) -> np.ndarray:
        """{"features": encoded request (one row), "item_idx": (n,)} -> (n,) scores."""
        if self.batching:
            return await self._rank_batch(request)
        return rank_requests(self.model, [request])[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)  # [2] requests arriving within 2 ms share a pass
    async def _rank_batch(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
        return rank_requests(self.model, requests)

    async def health(self) -> dict[str, Any]:
        return {"tasks": list(self.model.config.task_weights), "batching": self.batching}
