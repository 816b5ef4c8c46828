"""Graph retrieval: LightGCN-style propagation over the user-item engagement graph (He et al., SIGIR 2020).

LightGCN drops the feature transforms and non-linearities of a GCN: an embedding is the mean of its layer-k
propagations over the symmetrically normalised bipartite graph, A_hat = D_u^-1/2 A D_i^-1/2. The paper's users are
free embeddings, one per training user, so it can score only users it was trained on. A served request carries the
user's recent actions instead, so here users are never parameters: a user is the node the graph would give them,
computed from their history, which makes the model inductive (new users, the live history of known ones):

    I_0 = item embeddings (id + brand + category + price tables, so an item without edges still has a vector)
    I_{k+1} = A_hat^T A_hat I_k                    one item -> user -> item hop, K hops
    item vector  v_i = mean_k I_k[i]
    user vector  u   = sum_{i in history} v_i / sqrt(|history| * deg(i))     LightGCN's user-side aggregation

and the next engaged item is scored by u . v_i. The loss is the cross-entropy over the whole catalog when it has at
most `FULL_SOFTMAX_MAX_ITEMS` items, else the log-uniform sampled softmax with logQ correction.

The graph (one edge per engaged (user, item) pair of the training events) arrives through `prepare`; it is not part of
the state dict. What serving needs is: `item_final` (the propagated vectors, refreshed whenever the model enters eval
mode) and `item_degree`, both buffers, so a bundle serves without the graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from training.data.features import TableSizes
from training.models.embeddings import ItemEmbedding
from training.models.sampling import LogUniformSampler, full_softmax_loss, num_negatives, sampled_softmax_loss
from training.models.sasrec import FULL_SOFTMAX_MAX_ITEMS

GRAPH_INPUTS = ("graph_user", "graph_item")  # data keys of the edges `prepare` reads


@dataclass(frozen=True)
class LightGCNConfig(TableSizes):
    dim: int = 64
    n_layers: int = 2  # item -> user -> item hops; the paper found 2-3 layers best
    temperature: float = 1.0  # raw dot products, as in the paper
    neg_fraction: float = 0.0042  # sampled negatives when the catalog is too large for the full softmax


class LightGCN(nn.Module):
    """Inductive LightGCN: item embeddings propagated over the engagement graph, users aggregated from history."""

    def __init__(self, config: LightGCNConfig) -> None:
        super().__init__()
        c = self.config = config
        self.items = ItemEmbedding(c.n_items, c.n_brands, c.n_categories, c.n_price_buckets, c.dim)
        self.register_buffer("item_final", torch.zeros(c.n_items, c.dim))  # propagated vectors, what serving uses
        self.register_buffer("item_degree", torch.zeros(c.n_items))  # engaged users per item in the training graph
        self.sampler = LogUniformSampler(c.n_items)
        self.n_negatives = num_negatives(c.n_items, c.neg_fraction)
        self.edge_user: torch.Tensor | None = None  # (E,) the graph: set by prepare, not saved
        self.edge_item: torch.Tensor | None = None
        self.edge_weight: torch.Tensor | None = None  # (E,) 1 / sqrt(deg(u) deg(i))
        self.n_users = 0

    @classmethod
    def from_config(cls, d: dict) -> "LightGCN":
        return cls(LightGCNConfig.from_dict(d))

    def prepare(self, data: dict[str, np.ndarray]) -> None:
        """Item lookups, sampler counts and the graph (`GRAPH_INPUTS`: one edge per distinct (user, item) pair)."""
        self.items.fill_item_features(data)
        self.sampler.set_counts(torch.tensor(data["item_counts"]))
        self.set_graph(torch.tensor(data["graph_user"]), torch.tensor(data["graph_item"]))

    def set_graph(self, user: torch.Tensor, item: torch.Tensor) -> None:
        """(E,) user codes and item indices of the distinct engaged pairs; duplicates are an error (they would
        count twice in the degrees)."""
        if user.shape != item.shape or user.dim() != 1:
            raise ValueError(f"graph_user and graph_item must be equal-length vectors, got {tuple(user.shape)} and "
                             f"{tuple(item.shape)}")
        if len(item) and (int(item.min()) < 1 or int(item.max()) >= self.config.n_items):
            raise ValueError(f"graph items must lie in 1..{self.config.n_items - 1}")
        n_users = int(user.max()) + 1 if len(user) else 0
        if len(user) and len(torch.unique(user * self.config.n_items + item)) != len(user):
            raise ValueError("the graph has duplicate (user, item) edges")
        user_degree = torch.bincount(user, minlength=n_users).float()
        item_degree = torch.bincount(item, minlength=self.config.n_items).float()
        self.edge_user, self.edge_item, self.n_users = user.long(), item.long(), n_users
        self.edge_weight = (user_degree[user] * item_degree[item]).rsqrt()
        self.item_degree.copy_(item_degree)
        self.refresh()

    def propagate(self) -> torch.Tensor:
        """(n_items, D) mean of the K + 1 layers; needs the graph (`prepare`)."""
        if self.edge_user is None:
            raise RuntimeError("LightGCN.propagate needs the training graph: call prepare(data) first")
        dev = self.items.item.weight.device
        u_idx, i_idx, w = self.edge_user.to(dev), self.edge_item.to(dev), self.edge_weight.to(dev).unsqueeze(1)
        layer = self.items.summed(torch.arange(self.config.n_items, device=dev))  # I_0
        total = layer
        for _ in range(self.config.n_layers):
            users = torch.zeros(self.n_users, layer.shape[1], device=dev).index_add_(0, u_idx, w * layer[i_idx])
            layer = torch.zeros_like(layer).index_add_(0, i_idx, w * users[u_idx])
            total = total + layer
        return total / (self.config.n_layers + 1)

    @torch.no_grad()
    def refresh(self) -> None:
        """Recomputes `item_final` from the current weights (when the graph is known)."""
        if self.edge_user is not None:
            self.item_final.copy_(self.propagate())

    def train(self, mode: bool = True) -> "LightGCN":
        super().train(mode)
        if not mode:
            self.refresh()  # eval mode scores with vectors of the current weights, and saves them
        return self

    def _item_vectors(self) -> torch.Tensor:
        return self.propagate() if self.training else self.item_final

    def item_tower_by_index(self, item: torch.Tensor) -> torch.Tensor:
        """(B,) item indices -> (B, D) propagated vectors."""
        return self._item_vectors()[item]

    def item_tower(self, item: torch.Tensor, brand: torch.Tensor, category: torch.Tensor,
                   price: torch.Tensor) -> torch.Tensor:
        """(B,) indices -> (B, D). A known item gets its propagated vector; item = 0 (an item added after training,
        no edges) gets layer 0 of its attributes scaled like an item whose propagated layers are empty."""
        explicit = torch.stack(self.items.explicit_parts(item, brand, category, price)).sum(0)
        known = (item > 0).unsqueeze(1)
        return torch.where(known, self._item_vectors()[item], explicit / (self.config.n_layers + 1))

    def _user(self, hist_items: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        present = (hist_items > 0).float()  # (B, L)
        n = present.sum(1, keepdim=True).clamp(min=1.0)
        w = present * (n * self.item_degree[hist_items].clamp(min=1.0)).rsqrt()  # (B, L)
        return (w.unsqueeze(-1) * vectors[hist_items]).sum(1)  # (B, D)

    def user_tower(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
        """USER_INPUTS -> (B, D): the graph's aggregation of the history's items. Actions, ages and context are not
        used: the graph knows who engaged with what, not how or where."""
        return self._user(hist_items, self._item_vectors())

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Next-item loss of (history, engaged item) examples; returns a scalar."""
        V = self.propagate()  # one propagation per step: every item's vector depends on the weights
        u = self._user(hist_items, V)
        c = self.config
        if c.n_items <= FULL_SOFTMAX_MAX_ITEMS:
            return full_softmax_loss(u, V, target, c.temperature)
        neg_items, neg_log_q = self.sampler.sample(self.n_negatives)
        return sampled_softmax_loss(u, V[target], target, V[neg_items], neg_items, c.temperature,
                                    self.sampler.log_q(target), neg_log_q)
