"""The ranking core of a version at request time: score the candidates (and the items the policy must be able to
place) with the bundle's ranker, several requests in one forward pass, and return each request's ranked list with
the items' attributes for the policy. The Serve `Ranking` deployment holds one; nothing here imports Ray."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from training.data.features import USER_INPUTS, FeatureSpace
from training.models.ranker import score_candidates
from training.request.contracts import RankedList, RankRequest


class RankingCore:
    """One version's ranker and the catalog attributes its ranked lists carry."""

    def __init__(self, model: torch.nn.Module, space: FeatureSpace, items: Any) -> None:
        """Args:
            model: the bundle's ranker (eval mode); space: its feature space.
            items: the bundle's `items.parquet` table (row i = item index i + 1).
        """
        self.model, self.space = model, space
        self.item_ids = np.asarray(items.column("item_id").to_pylist(), dtype=object)
        self.brands = np.asarray(items.column("brand").to_pylist(), dtype=object)
        self.categories = np.asarray(items.column("category").to_pylist(), dtype=object)
        self.created_s = pc.cast(items.column("created_at"), "int64").to_numpy() / 1000.0
        self.in_stock = items.column("in_stock").to_numpy(zero_copy_only=False)

    @classmethod
    def from_bundle(cls, bundle: Any) -> "RankingCore":
        return cls(bundle.ranker(), bundle.space, bundle.items)

    @torch.inference_mode()
    def rank(self, requests: Sequence[RankRequest]) -> list[RankedList]:
        """Ranks several requests in one pass; each answer holds its best `n_out` items, best first, plus every
        pinned item the catalog knows wherever it ranks (reason "pinned" unless retrieval also found it)."""
        pools = [self._pool(r) for r in requests]
        stacked = [np.concatenate([r.candidates.features[k] for r in requests]) for k in USER_INPUTS]  # (B, ...)
        scores = score_candidates(self.model, *stacked, [idx for idx, _ in pools])
        return [self._ranked(r, idx, reasons, s) for r, (idx, reasons), s in zip(requests, pools, scores)]

    def _pool(self, req: RankRequest) -> tuple[np.ndarray, list[str]]:
        """Candidates, then the pinned items that are not candidates already (unknown ids are left out)."""
        cands = req.candidates
        pinned = self.space.lookup("item_ids", list(req.pinned_items))
        extra = np.setdiff1d(pinned[pinned > 0], cands.item_idx)
        return (np.concatenate([cands.item_idx, extra]).astype(np.int64),
                list(cands.reasons) + ["pinned"] * len(extra))

    def _ranked(self, req: RankRequest, item_idx: np.ndarray, reasons: list[str], scores: np.ndarray) -> RankedList:
        order = np.argsort(-scores, kind="stable")
        # The best n_out, and every pinned item wherever it ranks (they sit after the retrieved candidates).
        order = order[(np.arange(len(order)) < req.n_out) | (order >= len(req.candidates.item_idx))]
        rows = item_idx[order] - 1  # item index -> row of items.parquet
        return RankedList(self.item_ids[rows].tolist(), scores[order].astype(np.float32),
                          self.brands[rows].tolist(), self.categories[rows].tolist(), [reasons[i] for i in order],
                          created_at=self.created_s[rows], in_stock=self.in_stock[rows])
