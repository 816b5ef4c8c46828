"""The retrieval stage of a version: the user tower at request time, fan-out to the version's index shards, merge.

A single-vector model sends one query; a multi-interest model (one with `user_interests`, see
`training.multi_interest`) sends one query per interest and per explicit condition, all in one search call per shard,
and shares the k candidates between them by quota, each candidate carrying the reason that placed it.
"""
from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import torch
from ray import serve

from indexing.embed import get_shards, read_index_manifest
from indexing.shards import merge_top_k
from training.bundle import load_bundle
from training.features import USER_INPUTS
from training.interest_merge import ConditionConfig, category_query_buckets, explicit_conditions
from training.multi_interest import InterestQueries, interest_queries, merge_queries

COLD_START_EACH = 250  # popular and new items offered to a user without history, before ranking

Search = Callable[[np.ndarray, int], Awaitable[tuple[np.ndarray, np.ndarray]]]  # (nq, D), k -> D, I (nq, k)


def build_interest_queries(model: torch.nn.Module, features: dict[str, np.ndarray], item_category: np.ndarray,
                           category_names: list[str], query_category: np.ndarray,
                           conditions: ConditionConfig) -> InterestQueries:
    """One request's multi-interest queries: one per interest and per explicit condition.

    Args:
        features: the encoded request (`USER_INPUTS` arrays, one row each).
        item_category: (n_items + 1,) category index per item index, for the conditions' relevance filter.
        category_names: the bundle's category vocabulary; query_category: see `category_query_buckets`.
    """
    conds = explicit_conditions(features["hist_items"], features["context"], item_category, query_category,
                                conditions)
    return interest_queries(model, *(features[name] for name in USER_INPUTS), conds, category_names)


async def interest_candidates(q: InterestQueries, search: Search, k: int, item_category: np.ndarray,
                              min_score: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One search with every query, then the quota merge: item indices (m,), scores (m,) and m reasons
    ("interest:<i>" or "condition:category=<c>"), m <= k."""
    D, I = await search(q.xq, k)  # (nq, k)
    return merge_queries(D, I, q, 1, k, item_category, min_score)[0]


class QueryCache:
    """Least-recently-used cache of user queries, keyed by the encoded request's bytes.

    The key holds the history with its age buckets and the context, so an event posted to /events (or an action
    ageing into the next bucket) is a new key: a cached vector is only reused for exactly the same user state.
    """

    def __init__(self, size: int = 10_000) -> None:
        self.size, self.hits, self.misses = size, 0, 0
        self._entries: OrderedDict[bytes, Any] = OrderedDict()

    @staticmethod
    def key(features: dict[str, np.ndarray]) -> bytes:
        return b"".join(np.ascontiguousarray(features[name]).tobytes() for name in USER_INPUTS)

    def get_or_compute(self, features: dict[str, np.ndarray], compute: Callable[[], Any]) -> Any:
        key = self.key(features)
        if key in self._entries:
            self.hits += 1
            self._entries.move_to_end(key)
            return self._entries[key]
        self.misses += 1
        value = self._entries[key] = compute()
        if len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value


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
        self.cache = QueryCache()

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
            q = self.cache.get_or_compute(features, lambda: build_interest_queries(
                self.model, features, self.item_category, self.categories, self.query_category, self.conditions))
            idx, scores, reasons = await interest_candidates(q, self.search, k, self.item_category,
                                                             self.conditions.min_score)
            return {"item_idx": idx, "scores": scores, "reasons": reasons, "cold_start": False}
        xq = self.cache.get_or_compute(features, lambda: self._user_vector(features))  # (1, D)
        D, I = await self.search(xq, k)
        keep = I[0] >= 0
        return {"item_idx": I[0][keep], "scores": D[0][keep], "reasons": ["retrieval"] * int(keep.sum()),
                "cold_start": False}

    def _user_vector(self, features: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            # torch.tensor copies: arrays arriving through Serve are read-only.
            return self.model.user_tower(*(torch.tensor(features[name]) for name in USER_INPUTS)).numpy()

    async def health(self) -> dict[str, Any]:
        stats = await asyncio.gather(*[s.stats.remote() for s in self.shards])
        return {"shards": len(stats), "items": sum(s["ntotal"] for s in stats),
                "query_cache": {"hits": self.cache.hits, "misses": self.cache.misses}}
