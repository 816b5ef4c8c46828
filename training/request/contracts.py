"""The typed contracts between the request-time stages: what retrieval returns (`Candidates`), what ranking takes
(`RankRequest`) and returns (`RankedList`, the policy's input), and what the policy knows of the user (`UserState`).

Frozen where they cross a Serve hop: a deployment never mutates what another sent it. Arrays are NumPy, ids strings.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class ItemFilter:
    """Which items a request may get, applied inside the index search (empty fields admit everything)."""

    categories: tuple[str, ...] = ()  # any of these categories
    brands: tuple[str, ...] = ()  # any of these brands
    exclude_brands: tuple[str, ...] = ()  # none of these brands
    in_stock: bool | None = None  # True: only in stock; False: only out of stock
    price_min: float | None = None
    price_max: float | None = None

    def is_empty(self) -> bool:
        return self == ItemFilter()


@dataclass(frozen=True)
class RetrievalRequest:
    """One user's state from the online store and the request context, for a version's retrieval."""

    history: dict[str, Any]  # {"items", "actions", "timestamps"} oldest first (the online store's state)
    context: dict[str, Any]  # country, device, page, category, query; any may be None
    k: int  # candidates wanted
    filter: ItemFilter = field(default_factory=ItemFilter)


@dataclass(frozen=True)
class Candidates:
    """Retrieval's answer: up to k item indices of the version's bundle, best first, each with its reason."""

    features: dict[str, np.ndarray]  # the encoded request (`USER_INPUTS`, one row each): ranking reuses it
    item_idx: np.ndarray  # (m,) int64 item indices (1..n_items)
    scores: np.ndarray  # (m,) float32 retrieval scores
    reasons: tuple[str, ...]  # (m,) "retrieval", "interest:<i>", "condition:category=<c>", "cold_start:*"
    cold_start: bool = False  # no engagement to build a user vector from: popular and new items
    partial: bool = False  # an index shard did not answer: the candidates come from the others
    version: str = ""  # the bundle version whose user tower retrieved them ("" outside serving)
    index_version: str = ""  # the version whose index they were searched in
    now: float = 0.0  # the serving clock's instant the request was encoded at (training.request.clock); 0 = unset
    # (m,) float32 user tower . item tower of each candidate, whatever query found it (an interest, a condition, a
    # cold start): the retrieval score a ranker with `retrieval_feature` was trained on. None: not computed.
    user_scores: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not (len(self.item_idx) == len(self.scores) == len(self.reasons)):
            raise ValueError(f"Candidates: item_idx, scores and reasons differ in length: {len(self.item_idx)}, "
                             f"{len(self.scores)}, {len(self.reasons)}")
        if self.user_scores is not None and len(self.user_scores) != len(self.item_idx):
            raise ValueError(f"Candidates: {len(self.user_scores)} user_scores for {len(self.item_idx)} items")


@dataclass(frozen=True)
class RankRequest:
    """What the ranking stage scores: the candidates, and the items the policy must be able to place."""

    candidates: Candidates
    n_out: int  # the best n_out are returned (the policy needs room to down-sort and diversify)
    pinned_items: tuple[str, ...] = field(default_factory=tuple)  # e.g. sponsored item ids: scored and always kept
    # With exploration or a novelty quota on: candidates created at or after this instant (unix seconds, serving
    # clock) are kept beyond n_out too (at most MAX_NEW_KEPT, best first), so the policy's pool of new items is the
    # retrieved new items, not only those the top n_out happen to hold. None keeps none.
    new_since: float | None = None


MAX_NEW_KEPT = 50

@dataclass
class RankedList:
    """One request's ranked items, best first; the fields are parallel sequences of length n."""

    item_ids: list[str]
    scores: np.ndarray  # (n,) float32
    brands: list[str]
    categories: list[str]
    reasons: list[str]  # why each item is here, e.g. "retrieval", "interest:1", "cold_start:popular"
    created_at: np.ndarray | None = None  # (n,) float64 unix seconds; None: no item counts as new
    in_stock: np.ndarray | None = None  # (n,) bool; None: every item is in stock
    version: str = ""  # the bundle version whose ranker ordered them ("" outside serving)
    # (n,) the probability that the policy placed each item at its position (exploration is the only random
    # rule: `training.request.policy.apply_policy`); None before the policy ran
    propensity: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        if self.propensity is not None:
            self.propensity = np.asarray(self.propensity, dtype=np.float64).reshape(-1)
        if self.created_at is not None:
            self.created_at = np.asarray(self.created_at, dtype=np.float64).reshape(-1)
        if self.in_stock is not None:
            self.in_stock = np.asarray(self.in_stock, dtype=bool).reshape(-1)
        n = len(self.item_ids)
        lengths = {"scores": len(self.scores), "brands": len(self.brands), "categories": len(self.categories),
                   "reasons": len(self.reasons)}
        lengths.update({k: len(getattr(self, k)) for k in ("created_at", "in_stock", "propensity")
                        if getattr(self, k) is not None})
        wrong = {name: size for name, size in lengths.items() if size != n}
        if wrong:
            raise ValueError(f"RankedList fields must all have len(item_ids) = {n}; got {wrong}")

    def __len__(self) -> int:
        return len(self.item_ids)

    def take(self, order: Sequence[int], reasons: Sequence[str] | None = None) -> RankedList:
        """A new list holding the items at positions ``order`` (a reorder or a selection); ``reasons`` (indexed
        like this list) replaces the current reasons."""
        idx = [int(i) for i in order]
        pick = (lambda seq: list(itemgetter(*idx)(seq)) if len(idx) > 1 else [seq[i] for i in idx])
        return RankedList(
            item_ids=pick(self.item_ids), scores=self.scores[idx], brands=pick(self.brands),
            categories=pick(self.categories), reasons=pick(self.reasons if reasons is None else reasons),
            created_at=None if self.created_at is None else self.created_at[idx],
            in_stock=None if self.in_stock is None else self.in_stock[idx], version=self.version,
            propensity=None if self.propensity is None else self.propensity[idx])


@dataclass
class UserState:
    """What the policy knows about the requesting user."""

    bought_at: dict[str, float]  # item_id -> unix seconds of the user's latest purchase of it
    now: float  # unix seconds of the request
