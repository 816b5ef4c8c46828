"""The retrieval stage of a version: the user tower at request time, fan-out to the version's index shards, merge.

A single-vector model sends one query; a multi-interest model (one with `user_interests`, see
`training.multi_interest`) sends one query per interest and per explicit condition, all in one search call per shard,
and shares the k candidates between them by quota, each candidate carrying the reason that placed it.
"""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from ray import serve

from indexing.embed import get_shards, read_index_manifest
from indexing.shards import merge_top_k
from training.bundle import load_bundle
from training.features import USER_INPUTS
from training.multi_interest import (ConditionConfig, category_query_buckets, explicit_conditions, interest_queries,
                                     merge_queries)

COLD_START_EACH = 250  # popular and new items offered to a user without history, before ranking

Search = Callable[[np.ndarray, int], Awaitable[tuple[np.ndarray, np.ndarray]]]  # (nq, D), k -> D, I (nq, k)


async def interest_candidates(model: torch.nn.Module, features: dict[str, np.ndarray], search: Search, k: int,
                              item_category: np.ndarray, category_names: list[str], query_category: np.ndarray,
                              conditions: ConditionConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One request's multi-interest retrieval: queries per interest and condition, one search, the quota merge.

    Args:
        features: the encoded request (`USER_INPUTS` arrays, one row each).
        search: the version's index (all shards), searched once with every query.
        item_category: (n_items + 1,) category index per item index, for the conditions' relevance filter.
        category_names: the bundle's category vocabulary; query_category: see `category_query_buckets`.
    Returns:
        item indices (m,), scores (m,) and m reasons ("interest:<i>" or "condition:category=<c>"), m <= k.
    """
    conds = explicit_conditions(features["hist_items"], features["context"], item_category, query_category,
                                conditions)
    q = interest_queries(model, *(features[name] for name in USER_INPUTS), conds, category_names)
    D, I = await search(q.xq, k)  # (nq, k)
    return merge_queries(D, I, q, 1, k, item_category, conditions.min_score)[0]


@serve.deployment(ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4})
class Retrieval:
    """User tower at request time, fan-out to every index shard of the version, one merge to the top candidates."""

    def __init__(self, bundle_dir: str, threads: int = 1, conditions: dict | None = None) -> None:
        """conditions: `training.multi_interest.ConditionConfig` fields, for multi-interest models."""
        torch.set_num_threads(threads)
        bundle = load_bundle(bundle_dir)
        self.model = bundle.two_tower()
        self.shards = get_shards(bundle.version, len(read_index_manifest(bundle_dir)["shards"]))
        popularity = bundle.items.column("popularity").to_numpy()
        created = bundle.items.column("created_at").cast("int64").to_numpy()
        self.popular = np.argsort(-popularity, kind="stable")[:COLD_START_EACH] + 1  # item indices
        newest = np.argsort(-created, kind="stable") + 1
        self.new = newest[~np.isin(newest, self.popular)][:COLD_START_EACH]
        self.multi_interest = hasattr(self.model, "user_interests")
        self.conditions = ConditionConfig(**(conditions or {}))
        self.categories = list(bundle.space.categories)
        self.query_category = category_query_buckets(self.categories)
        self.item_category = bundle.item_features().category_idx

    async def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(nq, D) queries -> scores and item indices (nq, k) over every shard, -1 where fewer than k exist."""
        parts = await asyncio.gather(*[s.search.remote(xq, k) for s in self.shards])  # [1] fan out to all shards
        return merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)

    async def retrieve(self, features: dict[str, np.ndarray], k: int) -> dict[str, Any]:
        """Encoded request (see `deployments.pipeline.request_features`) -> top-k item indices, scores, reasons."""
        if not features["hist_actions"].any():  # cold start: no engagement to build a user vector from
            idx = np.concatenate([self.popular, self.new])[:k]
            reasons = ["cold_start:popular"] * len(self.popular) + ["cold_start:new"] * len(self.new)
            return {"item_idx": idx, "scores": np.zeros(len(idx), np.float32), "reasons": reasons[:k],
                    "cold_start": True}
        if self.multi_interest:
            idx, scores, reasons = await interest_candidates(self.model, features, self.search, k, self.item_category,
                                                             self.categories, self.query_category, self.conditions)
            return {"item_idx": idx, "scores": scores, "reasons": reasons, "cold_start": False}
        with torch.inference_mode():
            # torch.tensor copies: arrays arriving through Serve are read-only.
            xq = self.model.user_tower(*(torch.tensor(features[name]) for name in USER_INPUTS)).numpy()  # (1, D)
        D, I = await self.search(xq, k)
        keep = I[0] >= 0
        return {"item_idx": I[0][keep], "scores": D[0][keep], "reasons": ["retrieval"] * int(keep.sum()),
                "cold_start": False}

    async def health(self) -> dict[str, Any]:
        stats = await asyncio.gather(*[s.stats.remote() for s in self.shards])
        return {"shards": len(stats), "items": sum(s["ntotal"] for s in stats)}
