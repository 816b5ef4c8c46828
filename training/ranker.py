"""First ranker: a small multi-task MLP over user, item and context features.

One head per task (click, wishlist, add-to-cart, purchase), each a sigmoid trained with binary cross-entropy; one
combined score orders the list. The user side (history and context) is encoded once per request and broadcast over
all candidates, so scoring 500 candidates costs one user pass plus one batched item pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.embeddings import ContextEmbedding, ItemEmbedding, SequenceEmbedding, masked_mean

TASKS = ("click", "wishlist", "add_to_cart", "purchase")


@dataclass(frozen=True)
class RankerConfig:
    n_items: int
    n_brands: int
    n_categories: int
    n_price_buckets: int
    n_countries: int
    n_devices: int
    n_pages: int
    n_actions: int
    n_ages: int
    n_query_buckets: int
    dim: int = 32  # per-feature embedding size: the ranker sees few features, 32 is plenty on CPU
    hidden: int = 128
    # Weights of the per-task probabilities in the ordering score; purchase counts most because it is the
    # business outcome, click least because it is the cheapest signal.
    task_weights: tuple[float, ...] = field(default=(1.0, 0.5, 1.0, 2.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RankerConfig":
        return cls(**(dict(d) | {"task_weights": tuple(d.get("task_weights", (1.0, 0.5, 1.0, 2.0)))}))


class MultiTaskRanker(nn.Module):
    """Scores (user state, candidate) pairs for every task in `TASKS`."""

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D = c.dim
        self.items = ItemEmbedding(c.n_items, c.n_brands, c.n_categories, c.n_price_buckets, D)
        self.sequence = SequenceEmbedding(self.items, c.n_actions, c.n_ages, D)
        self.context = ContextEmbedding(c.n_countries, c.n_devices, c.n_pages, c.n_categories, c.n_query_buckets, D)
        self.user_proj = nn.Linear(2 * D, D)
        self.item_proj = nn.Linear(4 * D, D)
        # Input: user, item and their elementwise product (a cheap explicit interaction).
        self.head = nn.Sequential(nn.Linear(3 * D, c.hidden), nn.GELU(), nn.Linear(c.hidden, len(TASKS)))
        self.register_buffer("task_weights", torch.tensor(c.task_weights, dtype=torch.float32))

    @classmethod
    def from_config(cls, d: dict) -> "MultiTaskRanker":
        return cls(RankerConfig.from_dict(d))

    def prepare(self, data: dict) -> None:
        """Fills the item lookups from the training arrays (see `training.train_loop`)."""
        self.set_item_features(*(torch.from_numpy(np.asarray(data[k]))
                                 for k in ("item_brand", "item_category", "item_price")))

    def set_item_features(self, brand: torch.Tensor, category: torch.Tensor, price: torch.Tensor) -> None:
        self.items.set_item_features(brand, category, price)

    def encode_user(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                    context: torch.Tensor) -> torch.Tensor:
        """(B, L) x3, (B, C) -> (B, D): history and context, computed once per request."""
        pooled = masked_mean(*self.sequence(hist_items, hist_actions, hist_ages))  # (B, D)
        return self.user_proj(torch.cat([pooled, self.context(context)], dim=-1))

    def encode_items(self, item: torch.Tensor) -> torch.Tensor:
        """(...,) item indices -> (..., D)."""
        return self.item_proj(torch.cat(self.items.parts(item), dim=-1))

    def score(self, user: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Task logits for each candidate.

        Args:
            user: (N, D) encoded users, one row per candidate (expand a single user with `.expand`).
            items: (N,) candidate item indices.
        Returns:
            (N, T) logits.
        """
        v = self.encode_items(items)  # (N, D)
        return self.head(torch.cat([user, v, user * v], dim=-1))

    def combined(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, T) logits -> (N,) ordering score: task-weighted sum of probabilities."""
        return torch.sigmoid(logits) @ self.task_weights

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, item: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean binary cross-entropy over tasks for (B,) impressions with (B, T) labels; returns a scalar."""
        logits = self.score(self.encode_user(hist_items, hist_actions, hist_ages, context), item)
        return F.binary_cross_entropy_with_logits(logits, labels)


@torch.inference_mode()
def score_candidates(model: MultiTaskRanker, hist_items: np.ndarray, hist_actions: np.ndarray, hist_ages: np.ndarray,
                     context: np.ndarray, candidates: list[np.ndarray]) -> list[np.ndarray]:
    """Ordering scores for several requests' candidate lists in one forward pass.

    Each request's history is encoded once and shared by all its candidates.

    Args:
        hist_items, hist_actions, hist_ages: (B, L) per request; context: (B, C).
        candidates: B arrays of item indices, any lengths.
    Returns:
        B float32 arrays of combined scores, aligned with `candidates`.
    """
    user = model.encode_user(torch.tensor(hist_items), torch.tensor(hist_actions), torch.tensor(hist_ages),
                             torch.tensor(context))  # (B, D), once per request
    lengths = [len(c) for c in candidates]
    owner = torch.from_numpy(np.repeat(np.arange(len(candidates)), lengths))  # (N,) request of each candidate
    items = torch.from_numpy(np.concatenate(candidates).astype(np.int64)) if sum(lengths) else torch.zeros(0, dtype=torch.long)
    scores = model.combined(model.score(user[owner], items)).numpy()  # (N,)
    return np.split(scores, np.cumsum(lengths)[:-1])
