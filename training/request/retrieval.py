"""The retrieval core of a version at request time, without the index: encode the request, build the user's
queries, and merge what the index answered into candidates. The Serve `Retrieval` deployment holds one and runs the
search between `queries` and `merge`; nothing here imports Ray.

The algorithm is chosen once, from the bundle's config, when the core is built: a single-vector model (the seed
two-tower, the in-batch two-tower) sends one query; the multi-interest model sends one query per interest and per
explicit condition and shares the k candidates between them by quota (`training.request.interests`), with the
condition settings the version was trained and evaluated with.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from training.data.features import USER_INPUTS, FeatureSpace
from training.request.contracts import Candidates, RetrievalRequest
from training.request.features import request_features
from training.request.forward import ForwardIndex, ForwardUpdate
from training.request.interests import (ConditionConfig, InterestQueries, category_query_buckets, merge_queries,
                                        user_queries)

COLD_START_EACH = 250  # popular and new items offered to a user without history, before ranking
MULTI_INTEREST = "multi_interest"  # the registry name (`training.fit.registry`) of the multi-interest model


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


class RetrievalCore:
    """One version's request-time retrieval: `queries(request)`, then the caller's search, then `merge`."""

    def __init__(self, model: torch.nn.Module, space: FeatureSpace, item_category: np.ndarray,
                 popularity: np.ndarray, forward: ForwardIndex, model_name: str,
                 conditions: ConditionConfig = ConditionConfig(), cache_size: int = 10_000,
                 score_for_ranker: bool = True) -> None:
        """Args:
            model: the bundle's retrieval model (eval mode).
            item_category: (n_items + 1,) category index per item index.
            popularity: (n_items,) per bundle item (row i = item index i + 1), for cold start.
            forward: the version's item attributes: request filters and the newest items for cold start.
            model_name: the registry name the version was trained with; `MULTI_INTEREST` picks the multi-query path.
            conditions: the multi-interest model's explicit-condition settings (ignored otherwise).
            score_for_ranker: fill `Candidates.user_scores` (about a millisecond per 500 candidates): only a version
                whose ranker orders its list (alone or fused with retrieval's order) and takes retrieval scores
                needs them.
        """
        self.model, self.space, self.item_category = model, space, item_category
        self.multi_interest = model_name == MULTI_INTEREST
        if self.multi_interest and not hasattr(model, "user_interests"):
            raise ValueError(f"retrieval model {type(model).__name__} was recorded as {model_name!r} but has no "
                             "user_interests")
        self.conditions = conditions
        self.categories = list(space.categories)
        self.query_category = category_query_buckets(self.categories)
        self.forward = forward
        self.by_popularity = np.argsort(-popularity, kind="stable") + 1  # item indices, most popular first
        self.newest = np.argsort(-forward.created_s[1:], kind="stable") + 1
        self.cache = QueryCache(cache_size)
        self.score_for_ranker = score_for_ranker

    @classmethod
    def from_bundle(cls, bundle: Any) -> "RetrievalCore":
        """The core of a `training.fit.bundle.Bundle` (its retrieval model, items and recorded settings)."""
        retrieval = bundle.config.get("retrieval", {})
        ranker_takes_scores = (bundle.config.get("ranker", {}).get("retrieval_feature", False)
                               and retrieval.get("order", "ranker") != "retrieval")  # ranker or fused
        return cls(bundle.two_tower(), bundle.space, bundle.item_features().category_idx,
                   bundle.items.column("popularity").to_numpy(), ForwardIndex(bundle.items),
                   retrieval.get("model", ""), ConditionConfig.from_dict(retrieval.get("conditions")),
                   score_for_ranker=bool(ranker_takes_scores))

    def allowed(self, req: RetrievalRequest) -> np.ndarray | None:
        """(n_items + 1,) bool mask of the items the request's filter admits; None when it admits everything."""
        return self.forward.allowed(req.filter)

    def encode(self, req: RetrievalRequest, now_s: float) -> dict[str, np.ndarray]:
        return request_features(self.space, req.history, req.context, now_s)

    def queries(self, features: dict[str, np.ndarray]) -> InterestQueries | None:
        """The request's (nq, D) queries with their reasons, cached per user state; None for a cold start."""
        if not features["hist_actions"].any():  # no engagement to build a user vector from
            return None
        return self.cache.get_or_compute(features, lambda: self._queries(features))

    @torch.inference_mode()
    def _queries(self, features: dict[str, np.ndarray]) -> InterestQueries:
        arrays = [features[name] for name in USER_INPUTS]
        if self.multi_interest:
            return user_queries(self.model, arrays, self.item_category, self.categories, self.query_category,
                                self.conditions)
        # torch.tensor copies: arrays arriving through Serve are read-only.
        xq = self.model.user_tower(*(torch.tensor(a) for a in arrays)).numpy()  # (1, D)
        return InterestQueries(xq, np.zeros(1, np.int64), np.ones(1), np.zeros(1, np.int64), ["retrieval"])

    def merge(self, features: dict[str, np.ndarray], q: InterestQueries, D: np.ndarray, I: np.ndarray,
              k: int) -> Candidates:
        """The index's (nq, k) scores D and item indices I (-1 = none) -> at most k candidates with reasons. An item
        deleted since the index answered (a shard actor not yet told) is left out."""
        if self.forward.deleted.any():
            I = np.where(self.forward.deleted[np.maximum(I, 0)], -1, I)
        if self.multi_interest:
            idx, scores, reasons = merge_queries(D, I, q, 1, k, self.item_category, self.conditions.min_score)[0]
            user = None
        else:
            keep = I[0] >= 0
            idx, scores, reasons = I[0][keep], D[0][keep], ["retrieval"] * int(keep.sum())
            user = q.xq[0] if q is not None else None
        idx = idx.astype(np.int64)
        return Candidates(features, idx, scores.astype(np.float32), tuple(reasons),
                          user_scores=self.user_scores(features, idx, user) if self.score_for_ranker else None)

    def cold_start(self, features: dict[str, np.ndarray], k: int, allowed: np.ndarray | None = None) -> Candidates:
        """Popular and new items taken in turn (up to COLD_START_EACH of each, within the filter), for a user with no
        engagement. In turn, not popular first: a version that serves retrieval's order (its ranker lost offline)
        still shows both."""
        popular, newest = self.by_popularity, self.newest
        allowed = self.forward.live() if allowed is None else allowed  # never a deleted item
        popular, newest = popular[allowed[popular]], newest[allowed[newest]]
        popular = popular[:COLD_START_EACH]
        new = newest[~np.isin(newest, popular)][:COLD_START_EACH]
        turns = np.full((max(len(popular), len(new)), 2), -1, dtype=np.int64)  # row j: j-th popular, j-th new
        turns[:len(popular), 0], turns[:len(new), 1] = popular, new
        kinds = np.tile(np.array(["cold_start:popular", "cold_start:new"]), len(turns))
        taken = turns.ravel() >= 0
        idx = turns.ravel()[taken][:k]
        reasons = kinds[taken][:k].tolist()
        idx = idx.astype(np.int64)
        return Candidates(features, idx, np.zeros(len(idx), np.float32), tuple(reasons), cold_start=True,
                          user_scores=self.user_scores(features, idx) if self.score_for_ranker else None)

    @torch.inference_mode()
    def user_scores(self, features: dict[str, np.ndarray], idx: np.ndarray,
                    user: np.ndarray | None = None) -> np.ndarray:
        """(m,) user tower . item tower of the candidates (`Candidates.user_scores`): the number the ranker's
        training examples carry (`training.fit.ranker_data.retrieval_scores`), from the items' current attributes.
        `user`: the request's user vector when the caller has it (the single-vector query)."""
        if len(idx) == 0:
            return np.zeros(0, np.float32)
        if user is None:
            user = self.model.user_tower(*(torch.tensor(features[name]) for name in USER_INPUTS)).numpy()[0]
        return (self.item_vectors(idx) @ np.asarray(user, np.float32)).astype(np.float32)

    @torch.inference_mode()
    def item_vectors(self, idx: np.ndarray) -> np.ndarray:
        """(n,) item indices -> (n, D) float32 vectors from the items' current attributes. An item new to the bundle
        embeds from its brand, category and price alone (the tower's unknown-item row), without a retrain."""
        if not hasattr(self.model, "item_tower"):
            raise ValueError(f"{type(self.model).__name__} has no attribute item tower: live item changes need one")
        f = self.forward
        inputs = (np.where(idx <= f.n_trained, idx, 0), self.space.lookup("brands", f.brands[idx].tolist()),
                  self.space.lookup("categories", f.categories[idx].tolist()), self.space.price_bucket(f.price[idx]))
        return self.model.item_tower(*(torch.from_numpy(np.asarray(a, np.int64)) for a in inputs)).numpy()

    def applied(self, update: ForwardUpdate) -> None:
        """Follows a change of the forward index (`ForwardIndex.apply`): item categories, the newest items."""
        if len(self.item_category) < len(self.forward.item_ids):
            grown = np.zeros(len(self.forward.item_ids), dtype=self.item_category.dtype)
            grown[:len(self.item_category)] = self.item_category
            self.item_category = grown
        if len(update.embed):
            self.item_category[update.embed] = self.space.lookup(
                "categories", self.forward.categories[update.embed].tolist())
            self.newest = np.argsort(-self.forward.created_s[1:], kind="stable") + 1

    def stats(self) -> dict[str, Any]:
        return {"model": "multi_interest" if self.multi_interest else "single_vector",
                "query_cache": {"hits": self.cache.hits, "misses": self.cache.misses}}
