"""The ranking stage of a version: the multi-task ranker, batching concurrent requests into one forward pass."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray import serve

from training.bundle import load_bundle
from training.features import USER_INPUTS
from training.ranker import score_candidates


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Ranking:
    """Multi-task ranker; concurrent requests are scored together in one forward pass."""

    def __init__(self, bundle_dir: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load_bundle(bundle_dir).ranker()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)  # [2] requests arriving within 2 ms share a pass
    async def rank(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
        """Each request: {"features": encoded request, "item_idx": (n,)} -> (n,) scores."""
        stacked = [np.concatenate([r["features"][k] for r in requests]) for k in USER_INPUTS]
        return score_candidates(self.model, *stacked, [r["item_idx"] for r in requests])

    async def health(self) -> dict[str, Any]:
        return {"tasks": list(self.model.config.task_weights)}
