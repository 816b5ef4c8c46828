"""One model version as a Serve application: VersionPipeline -> Retrieval (user tower + shards) -> Ranking.

Every replica of a version loads the same bundle, so a request never mixes one model with another's item vectors.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from indexing.embed import get_shards, read_index_manifest
from indexing.shards import merge_top_k
from training.bundle import load_bundle
from training.features import encode_context, encode_history
from training.ranker import score_candidates

COLD_START_EACH = 250  # popular and new items offered to a user without history, before ranking


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


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

    async def retrieve(self, hist_items: np.ndarray, hist_actions: np.ndarray, context: np.ndarray,
                       k: int) -> dict[str, Any]:
        """(1, L), (1, L), (1, 3) -> the top-k item indices by inner product, with scores and reasons."""
        if not hist_actions.any():  # cold start: no engagement to build a user vector from
            idx = np.concatenate([self.popular, self.new])[:k]
            reasons = ["cold_start:popular"] * len(self.popular) + ["cold_start:new"] * len(self.new)
            return {"item_idx": idx, "scores": np.zeros(len(idx), np.float32), "reasons": reasons[:k],
                    "cold_start": True}
        with torch.inference_mode():
            # torch.tensor copies: arrays arriving through Serve are read-only.
            xq = self.model.user_tower(torch.tensor(hist_items), torch.tensor(hist_actions),
                                       torch.tensor(context)).numpy()  # (1, D)
        parts = await asyncio.gather(*[s.search.remote(xq, k) for s in self.shards])  # [1] fan out to all shards
        D, I = merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)
        keep = I[0] >= 0
        return {"item_idx": I[0][keep], "scores": D[0][keep], "reasons": ["retrieval"] * int(keep.sum()),
                "cold_start": False}

    async def health(self) -> dict[str, Any]:
        stats = await asyncio.gather(*[s.stats.remote() for s in self.shards])
        return {"shards": len(stats), "items": sum(s["ntotal"] for s in stats)}


@serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=16,
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class Ranking:
    """Multi-task ranker; concurrent requests are scored together in one forward pass."""

    def __init__(self, bundle_dir: str, threads: int = 1) -> None:
        torch.set_num_threads(threads)
        self.model = load_bundle(bundle_dir).ranker()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)  # [2] requests arriving within 2 ms share a pass
    async def rank(self, requests: list[dict[str, Any]]) -> list[np.ndarray]:
        """Each request: {hist_items (1, L), hist_actions (1, L), context (1, 3), item_idx (n,)} -> (n,) scores."""
        scores = score_candidates(self.model, np.concatenate([r["hist_items"] for r in requests]),
                                  np.concatenate([r["hist_actions"] for r in requests]),
                                  np.concatenate([r["context"] for r in requests]),
                                  [r["item_idx"] for r in requests])
        return scores

    async def health(self) -> dict[str, Any]:
        return {"tasks": list(self.model.config.task_weights)}


@serve.deployment(ray_actor_options={"num_cpus": 0.1},
                  autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8})
class VersionPipeline:
    """Ingress of a version's application: encodes the request once, then retrieval, then ranking."""

    def __init__(self, retrieval: DeploymentHandle, ranking: DeploymentHandle, bundle_dir: str,
                 candidates: int = 500) -> None:
        bundle = load_bundle(bundle_dir)
        self.bundle_dir, self.version, self.space, self.candidates = bundle_dir, bundle.version, bundle.space, candidates
        self.item_ids = np.asarray(bundle.items.column("item_id").to_pylist(), dtype=object)
        self.brands = np.asarray(bundle.items.column("brand").to_pylist(), dtype=object)
        self.categories = np.asarray(bundle.items.column("category").to_pylist(), dtype=object)
        self.created_s = pc.cast(bundle.items.column("created_at"), "int64").to_numpy() / 1000.0
        self.retrieval, self.ranking = retrieval, ranking

    async def recommend(self, history: dict[str, Any], context: dict[str, Any], n_out: int) -> dict[str, Any]:
        """The ranked list (best first, at most n_out) for one user state and request context."""
        hist_items, hist_actions = encode_history(self.space, history["items"], history["actions"])
        ctx = encode_context(self.space, [context.get("country")], [context.get("device")], [context.get("page")])
        t0 = time.perf_counter()
        found = await self.retrieval.retrieve.remote(hist_items, hist_actions, ctx, self.candidates)
        t_retrieval = _ms(t0)
        t1 = time.perf_counter()
        scores = await self.ranking.rank.remote({"hist_items": hist_items, "hist_actions": hist_actions,
                                                 "context": ctx, "item_idx": found["item_idx"]})
        order = np.argsort(-scores, kind="stable")[:n_out]
        idx = found["item_idx"][order] - 1  # item index -> row of items.parquet
        return {"version": self.version, "cold_start": found["cold_start"],
                "item_ids": self.item_ids[idx].tolist(), "scores": scores[order].astype(np.float32),
                "brands": self.brands[idx].tolist(), "categories": self.categories[idx].tolist(),
                "reasons": [found["reasons"][i] for i in order], "created_at": self.created_s[idx],
                "timings_ms": {"retrieval": t_retrieval, "ranking": _ms(t1)}}

    async def info(self) -> dict[str, Any]:
        manifest = read_index_manifest(self.bundle_dir)
        return {"version": self.version, "bundle": self.bundle_dir,
                "index": {"n_items": manifest["n_items"], "shards": len(manifest["shards"]),
                          "built_at": manifest["built_at"], "index_type": manifest["index_type"]}}

    async def health(self) -> dict[str, Any]:
        retrieval, ranking = await asyncio.gather(self.retrieval.health.remote(), self.ranking.health.remote())
        return {"version": self.version, "retrieval": retrieval, "ranking": ranking}
