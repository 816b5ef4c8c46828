"""The ranking core of a version at request time: score the candidates (and the items the policy must be able to
place) with the bundle's ranker, several requests in one forward pass, and return each request's ranked list with
the items' attributes for the policy. The Serve `Ranking` deployment holds one; nothing here imports Ray."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from training.data.features import USER_INPUTS, FeatureSpace
from training.models.ranker import score_candidates
from training.request.contracts import MAX_NEW_KEPT, RankedList, RankRequest
from training.request.forward import ForwardIndex


ORDERS = ("ranker", "retrieval", "fused")
RRF_K = 60  # the reciprocal-rank-fusion constant of Cormack et al. (SIGIR 2009): no tuning on our data


def fuse_with_retrieval(scores: np.ndarray) -> np.ndarray:
    """(..., M) ranker scores of candidates in retrieval's order -> (..., M) reciprocal-rank fusion of both orders,
    1 / (RRF_K + ranker rank) + 1 / (RRF_K + retrieval rank), ranks from 1: the ranker re-orders within what
    retrieval already agrees on instead of replacing its order."""
    scores = np.asarray(scores)
    ranker_rank = np.argsort(np.argsort(-scores, axis=-1, kind="stable"), axis=-1, kind="stable") + 1
    retrieval_rank = np.arange(1, scores.shape[-1] + 1)
    return 1.0 / (RRF_K + ranker_rank) + 1.0 / (RRF_K + retrieval_rank)


class RankingCore:
    """One version's ranker and the catalog attributes its ranked lists carry."""

    def __init__(self, model: torch.nn.Module, space: FeatureSpace, forward: ForwardIndex,
                 order: str = "ranker") -> None:
        """Args:
            model: the bundle's ranker (eval mode); space: its feature space.
            forward: the version's item attributes, which the ranked lists carry to the policy.
            order: "ranker" (its order), "retrieval" (retrieval's own order and scores) or "fused" (the two
                orders' reciprocal-rank fusion, `fuse_with_retrieval`): the one the version's evaluation found
                best offline (`training.fit.offline_metrics.serving_order`).
        """
        if order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {order!r}")
        self.model, self.space, self.forward, self.order = model, space, forward, order
        self.uses_retrieval_score = bool(getattr(getattr(model, "config", None), "retrieval_feature", False))

    @classmethod
    def from_bundle(cls, bundle: Any) -> "RankingCore":
        return cls(bundle.ranker(), bundle.space, ForwardIndex(bundle.items),
                   (bundle.config.get("retrieval") or {}).get("order", "ranker"))

    @torch.inference_mode()
    def rank(self, requests: Sequence[RankRequest]) -> list[RankedList]:
        """Ranks several requests in one pass; each answer holds its best `n_out` items, best first, plus every
        pinned item the catalog knows wherever it ranks (reason "pinned" unless retrieval also found it)."""
        pools = [self._pool(r) for r in requests]
        if self.order == "retrieval":  # the candidates in retrieval's order, pinned items after them
            return [self._ranked(r, idx, reasons, self._retrieval_scores(r, len(idx)), n)
                    for r, (idx, reasons, n) in zip(requests, pools)]
        stacked = [np.concatenate([r.candidates.features[k] for r in requests]) for k in USER_INPUTS]  # (B, ...)
        known = self.forward.n_trained  # items added since the bundle score as the ranker's unknown item
        retrieval = ([self._user_scores(r, len(idx)) for r, (idx, _, _) in zip(requests, pools)]
                     if self.uses_retrieval_score else None)
        scores = score_candidates(self.model, *stacked, [np.where(idx <= known, idx, 0) for idx, _, _ in pools],
                                  retrieval)
        if self.order == "fused":  # the pool is in retrieval's order (pinned items after the candidates)
            # A cold-start list's order is its popular / new interleave, not a relevance ranking to fuse with: it
            # keeps that order, so the answer shows both kinds (as a version serving retrieval's order does).
            scores = [self._retrieval_scores(r, len(idx)) if r.candidates.cold_start
                      else fuse_with_retrieval(s).astype(np.float32)
                      for r, (idx, _, _), s in zip(requests, pools, scores)]
        return [self._ranked(r, idx, reasons, s, n) for r, (idx, reasons, n), s in zip(requests, pools, scores)]

    def _user_scores(self, req: RankRequest, n: int) -> np.ndarray:
        """The pool's retrieval scores (`Candidates.user_scores`) for a ranker that takes them; a pinned item that
        retrieval did not bring gets the lowest candidate's score (retrieval ranked it below all of them)."""
        cands = req.candidates
        if cands.user_scores is None:
            raise ValueError("ranking: this version's ranker takes retrieval scores, and the candidates carry none "
                             "(Candidates.user_scores)")
        s = cands.user_scores[cands.item_idx < len(self.forward.item_ids)]  # as `_pool` keeps them
        low = float(s.min()) if len(s) else 0.0
        return np.concatenate([s, np.full(n - len(s), low, np.float32)]).astype(np.float32)

    @staticmethod
    def _retrieval_scores(req: RankRequest, n: int) -> np.ndarray:
        """Scores that keep retrieval's order: decreasing with the candidate's position (pinned items last)."""
        return (n - np.arange(n, dtype=np.float32)) / max(n, 1)

    def _pool(self, req: RankRequest) -> tuple[np.ndarray, list[str], int]:
        """Candidates, then the pinned items that are not candidates already (unknown ids are left out). A candidate
        this replica does not know yet (an item retrieval's replica added from the change log a moment earlier) is
        left out until it has applied the change too."""
        cands = req.candidates
        idx, reasons = cands.item_idx, list(cands.reasons)
        known = idx < len(self.forward.item_ids)
        if not known.all():
            idx, reasons = idx[known], [r for r, k in zip(reasons, known) if k]
        pinned = np.asarray([self.forward.index_of(i) for i in req.pinned_items], dtype=np.int64)
        extra = np.setdiff1d(pinned[pinned > 0], idx)
        return np.concatenate([idx, extra]).astype(np.int64), reasons + ["pinned"] * len(extra), len(idx)

    def _ranked(self, req: RankRequest, item_idx: np.ndarray, reasons: list[str], scores: np.ndarray,
                n_candidates: int) -> RankedList:
        order = np.argsort(-scores, kind="stable")
        f = self.forward
        # The best n_out, and every pinned item wherever it ranks (they sit after the retrieved candidates), and the
        # best new candidates below n_out for exploration and the novelty quota (`RankRequest.new_since`).
        keep = (np.arange(len(order)) < req.n_out) | (order >= n_candidates)
        if req.new_since is not None:
            new_below = ~keep & (f.created_s[item_idx[order]] >= req.new_since)
            keep |= new_below & (np.cumsum(new_below) <= MAX_NEW_KEPT)
        order = order[keep]
        idx = item_idx[order]
        return RankedList(f.item_ids[idx].tolist(), scores[order].astype(np.float32), f.brands[idx].tolist(),
                          f.categories[idx].tolist(), [reasons[i] for i in order], created_at=f.created_s[idx],
                          in_stock=f.in_stock[idx])
