"""One model version as a Serve application: VersionPipeline -> Retrieval (user tower + shards) -> Ranking.

Every replica of a version loads the same bundle, so a request never mixes one model with another's item vectors.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pyarrow.compute as pc
from ray import serve
from ray.serve.handle import DeploymentHandle

from indexing.embed import read_index_manifest
from training.bundle import load_bundle
from training.features import FeatureSpace, encode_context, encode_history


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def request_features(space: FeatureSpace, history: dict[str, Any], context: dict[str, Any],
                     now_s: float) -> dict[str, np.ndarray]:
    """The encoded request every model reads: `USER_INPUTS` arrays, each with one row.

    Args:
        history: the online store's state of the user ({items, actions, timestamps} oldest first).
        context: the request context (country, device, page, category, query; any may be missing).
    """
    items, actions, ages = encode_history(space, history["items"], history["actions"], history.get("timestamps"),
                                          now_s)
    ctx = encode_context(space, [context.get("country")], [context.get("device")], [context.get("page")],
                         [context.get("category")], [context.get("query")])
    return {"hist_items": items, "hist_actions": actions, "hist_ages": ages, "context": ctx}


def _with_included(item_idx: np.ndarray, reasons: list[str], include: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Candidates plus the included items (known, not yet candidates) appended at the end, reason "included"."""
    extra = np.setdiff1d(include[include > 0], item_idx)
    return np.concatenate([item_idx, extra]).astype(np.int64), reasons + ["included"] * len(extra)


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
        names = bundle.items.column_names
        self.in_stock = (bundle.items.column("in_stock").to_numpy(zero_copy_only=False) if "in_stock" in names
                         else np.ones(len(self.item_ids), dtype=bool))
        self.retrieval, self.ranking = retrieval, ranking

    async def recommend(self, history: dict[str, Any], context: dict[str, Any], n_out: int) -> dict[str, Any]:
        """The ranked list (best first) for one user state and request context.

        Holds the best `n_out` candidates, plus every item of `context["include_items"]` (the policy's sponsored
        list) that the catalog knows: those are ranked with the candidates so the policy can place them.
        """
        features = request_features(self.space, history, context, time.time())
        t0 = time.perf_counter()
        found = await self.retrieval.retrieve.remote(features, self.candidates)
        t_retrieval = _ms(t0)
        item_idx, reasons = _with_included(found["item_idx"], list(found["reasons"]),
                                           self.space.lookup("item_ids", context.get("include_items") or []))
        t1 = time.perf_counter()
        scores = await self.ranking.rank.remote({"features": features, "item_idx": item_idx})
        order = np.argsort(-scores, kind="stable")
        # The best n_out, and every included item wherever it ranks (they sit after the retrieved candidates).
        order = order[(np.arange(len(order)) < n_out) | (order >= len(found["item_idx"]))]
        idx = item_idx[order] - 1  # item index -> row of items.parquet
        return {"version": self.version, "cold_start": found["cold_start"],
                "item_ids": self.item_ids[idx].tolist(), "scores": scores[order].astype(np.float32),
                "brands": self.brands[idx].tolist(), "categories": self.categories[idx].tolist(),
                "reasons": [reasons[i] for i in order], "created_at": self.created_s[idx],
                "in_stock": self.in_stock[idx], "timings_ms": {"retrieval": t_retrieval, "ranking": _ms(t1)}}

    async def info(self) -> dict[str, Any]:
        manifest = read_index_manifest(self.bundle_dir)
        return {"version": self.version, "bundle": self.bundle_dir,
                "index": {"n_items": manifest["n_items"], "shards": len(manifest["shards"]),
                          "built_at": manifest["built_at"], "index_type": manifest["index_type"]}}

    async def health(self) -> dict[str, Any]:
        retrieval, ranking = await asyncio.gather(self.retrieval.health.remote(), self.ranking.health.remote())
        return {"version": self.version, "retrieval": retrieval, "ranking": ranking}
