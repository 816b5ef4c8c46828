"""The retrieval stage of a version: the user tower at request time, fan-out to the version's index shards, merge."""
from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import torch
from ray import serve

from indexing.embed import get_shards, read_index_manifest
from indexing.shards import merge_top_k
from training.bundle import load_bundle
from training.features import USER_INPUTS

COLD_START_EACH = 250  # popular and new items offered to a user without history, before ranking


@serve.deployment(ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4})
class Retrieval:
    """User tower at request time, fan-out to every index shard of the version, one merge to the top candidates."""

    def __init__(self, bundle_dir: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        bundle = load_bundle(bundle_dir)
        self.model = bundle.two_tower()
        self.shards = get_shards(bundle.version, len(read_index_manifest(bundle_dir)["shards"]))
        popularity = bundle.items.column("popularity").to_numpy()
        created = bundle.items.column("created_at").cast("int64").to_numpy()
        self.popular = np.argsort(-popularity, kind="stable")[:COLD_START_EACH] + 1  # item indices
        newest = np.argsort(-created, kind="stable") + 1
        self.new = newest[~np.isin(newest, self.popular)][:COLD_START_EACH]

    async def retrieve(self, features: dict[str, np.ndarray], k: int) -> dict[str, Any]:
        """Encoded request (see `deployments.pipeline.request_features`) -> top-k item indices, scores, reasons."""
        if not features["hist_actions"].any():  # cold start: no engagement to build a user vector from
            idx = np.concatenate([self.popular, self.new])[:k]
            reasons = ["cold_start:popular"] * len(self.popular) + ["cold_start:new"] * len(self.new)
            return {"item_idx": idx, "scores": np.zeros(len(idx), np.float32), "reasons": reasons[:k],
                    "cold_start": True}
        with torch.inference_mode():
            # torch.tensor copies: arrays arriving through Serve are read-only.
            xq = self.model.user_tower(*(torch.tensor(features[name]) for name in USER_INPUTS)).numpy()  # (1, D)
        parts = await asyncio.gather(*[s.search.remote(xq, k) for s in self.shards])  # [1] fan out to all shards
        D, I = merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)
        keep = I[0] >= 0
        return {"item_idx": I[0][keep], "scores": D[0][keep], "reasons": ["retrieval"] * int(keep.sum()),
                "cold_start": False}

    async def health(self) -> dict[str, Any]:
        stats = await asyncio.gather(*[s.stats.remote() for s in self.shards])
        return {"shards": len(stats), "items": sum(s["ntotal"] for s in stats)}
