"""Embedding blocks shared by every model: item features, the action sequence, and the request context.

Each model owns its tables (a ranker and a retrieval model learn different spaces); these modules only fix how the
inputs are looked up and combined, so that every model reads the same encoded arrays (see `training.data.features`).
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn

from training.data.features import ITEM_LOOKUPS, QUERY_TOKENS, TableSizes


INIT_STD = 0.1  # every table's initial spread
ITEM_INIT = "item_init"  # training array of vectors the item id table starts from (`ItemEmbedding.init_item_vectors`)


def _table(n: int, dim: int) -> nn.Embedding:
    emb = nn.Embedding(n, dim, padding_idx=0)
    nn.init.normal_(emb.weight, std=INIT_STD)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class ItemEmbedding(nn.Module):
    """Item id, brand, category and price bucket tables; attributes come from buffers filled from the catalog, so a
    caller passes item indices only."""

    def __init__(self, n_items: int, n_brands: int, n_categories: int, n_price_buckets: int, dim: int) -> None:
        super().__init__()
        self.item = _table(n_items, dim)
        self.brand = _table(n_brands, dim)
        self.category = _table(n_categories, dim)
        self.price = _table(n_price_buckets, dim)
        for name in ITEM_LOOKUPS:
            self.register_buffer(name, torch.zeros(n_items, dtype=torch.long))

    def set_item_features(self, brand: torch.Tensor, category: torch.Tensor, price: torch.Tensor) -> None:
        """Fills the lookup buffers, each (n_items,) indexed by item index."""
        self.item_brand.copy_(brand)
        self.item_category.copy_(category)
        self.item_price.copy_(price)

    def fill_item_features(self, data: Mapping[str, np.ndarray]) -> None:
        """Fills the buffers from training arrays keyed by `ITEM_LOOKUPS` (see `training.data.features.item_lookups`)."""
        # torch.tensor copies: arrays from the object store are read-only, which torch.from_numpy warns about.
        self.set_item_features(*(torch.tensor(np.asarray(data[k]), dtype=torch.long) for k in ITEM_LOOKUPS))
        if ITEM_INIT in data:  # the item tower's vectors (train.ranker_item_init: tower)
            self.init_item_vectors(data[ITEM_INIT])

    def init_item_vectors(self, vectors: np.ndarray | torch.Tensor) -> None:
        """Starts the item id table from other item vectors (e.g. the version's item tower), (n_items, D) by item
        index: projected onto their top `dim` principal directions when D > dim (zero-padded when D < dim) and
        scaled to this table's initial spread, so the ranker starts from what retrieval learned about each item
        and goes on learning from there. Row 0 (padding) stays zero."""
        v = torch.tensor(np.array(vectors, dtype=np.float32))  # a copy: arrays from the object store are read-only
        n, dim = self.item.weight.shape
        if v.ndim != 2 or len(v) != n:
            raise ValueError(f"item init vectors must be ({n}, D) by item index, got shape {tuple(v.shape)}")
        x = v[1:] - v[1:].mean(0)
        if x.shape[1] > dim:
            _, _, vh = torch.linalg.svd(x, full_matrices=False)  # principal directions, largest variance first
            x = x @ vh[:dim].T
        else:
            x = torch.nn.functional.pad(x, (0, dim - x.shape[1]))
        x = x * (INIT_STD / x.std().clamp(min=1e-12))
        with torch.no_grad():
            self.item.weight[1:].copy_(x)
            self.item.weight[0].zero_()

    def parts(self, item: torch.Tensor) -> list[torch.Tensor]:
        """(...,) item indices -> [id, brand, category, price] embeddings, each (..., dim)."""
        return self.explicit_parts(item, self.item_brand[item], self.item_category[item], self.item_price[item])

    def explicit_parts(self, item: torch.Tensor, brand: torch.Tensor, category: torch.Tensor,
                       price: torch.Tensor) -> list[torch.Tensor]:
        """The same from attributes given by the caller: items new to the bundle (index 0) still embed."""
        return [self.item(item), self.brand(brand), self.category(category), self.price(price)]

    def summed(self, item: torch.Tensor) -> torch.Tensor:
        """(...,) -> (..., dim): the sum of the parts, for sequence tokens."""
        return torch.stack(self.parts(item)).sum(0)


class SequenceEmbedding(nn.Module):
    """Tokens of the action sequence: item (summed item features) + action type + age bucket."""

    def __init__(self, items: ItemEmbedding, n_actions: int, n_ages: int, dim: int) -> None:
        super().__init__()
        self.items = items
        self.action = _table(n_actions, dim)
        self.age = _table(n_ages, dim)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor,
                hist_ages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) x3 -> tokens (B, L, dim) and mask (B, L) bool, True where an action is present."""
        tokens = self.items.summed(hist_items) + self.action(hist_actions) + self.age(hist_ages)
        return tokens, hist_actions > 0


class ContextEmbedding(nn.Module):
    """The request context (country, device, page, category, query tokens) averaged over the fields present."""

    def __init__(self, n_countries: int, n_devices: int, n_pages: int, n_categories: int, n_query_buckets: int,
                 dim: int) -> None:
        super().__init__()
        self.country = _table(n_countries, dim)
        self.device = _table(n_devices, dim)
        self.page = _table(n_pages, dim)
        self.category = _table(n_categories, dim)
        self.query = _table(n_query_buckets, dim)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        """(B, 4 + QUERY_TOKENS) indices (see `training.data.features.CONTEXT_COLUMNS`) -> (B, dim)."""
        parts = torch.stack([self.country(context[:, 0]), self.device(context[:, 1]), self.page(context[:, 2]),
                             self.category(context[:, 3])]
                            + [self.query(context[:, 4 + i]) for i in range(QUERY_TOKENS)], dim=1)  # (B, F, dim)
        present = (context > 0).unsqueeze(-1).float()  # padding rows are zero vectors; average over the rest
        return (parts * present).sum(1) / present.sum(1).clamp(min=1.0)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D) mean over present tokens (zeros for an empty history)."""
    m = mask.unsqueeze(-1).float()
    return (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)


def input_embeddings(sizes: TableSizes, dim: int) -> tuple[ItemEmbedding, SequenceEmbedding, ContextEmbedding]:
    """The three input blocks of a model over `USER_INPUTS` and item indices; the sequence shares the item tables."""
    items = ItemEmbedding(sizes.n_items, sizes.n_brands, sizes.n_categories, sizes.n_price_buckets, dim)
    return (items, SequenceEmbedding(items, sizes.n_actions, sizes.n_ages, dim),
            ContextEmbedding(sizes.n_countries, sizes.n_devices, sizes.n_pages, sizes.n_categories,
                             sizes.n_query_buckets, dim))
