"""Two-tower retrieval model: a user tower over recent engagements plus context, an item tower over item features.

Follows Yi et al., "Sampling-Bias-Corrected Neural Modeling for Large Corpus Item Recommendations" (RecSys 2019):
both towers end in an L2-normalised vector, the score is their dot product over a temperature, and training uses an
in-batch softmax with logQ correction. In-batch negatives are drawn in proportion to popularity, so without the
correction the model learns to push popular items down; subtracting log q(item) from each logit removes that bias
(on the demo shop it raised NDCG@10 of the held-out split from 0.004 to 0.08, against 0.015 for popularity).

`SeedTwoTower` is the seed-000 model on the same item tower: the user tower encodes the action sequence (item,
action type, time-since tokens) with a small transformer (or attention pooling as the baseline) plus the averaged
context, and training uses a sampled softmax over log-uniform (Zipf over popularity rank) negatives, a fraction of
the catalog per batch, with logQ correction, optionally mixed with in-batch negatives (`training.models.sampling`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models.embeddings import input_embeddings, masked_mean
from training.data.features import TableSizes
from training.models.sampling import LogUniformSampler, num_negatives, sampled_softmax_loss
from training.models.blocks import SelfAttentionBlock, attention_mask, mlp, recency_positions



@dataclass(frozen=True)
class TwoTowerConfig(TableSizes):
    dim: int = 64  # output dimension: 64 floats per item keep a 1M-item flat index at 256 MB
    hidden: int = 128
    temperature: float = 0.1  # best of 0.05 / 0.1 on the demo shop's held-out NDCG@10


class TwoTower(nn.Module):
    """User and item towers sharing the item id, brand and category tables.

    The item attributes of history items are looked up from buffers filled from the bundle's catalog, so a request
    only needs the item ids of the user's recent actions.
    """

    def __init__(self, config: TwoTowerConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D = c.dim
        self.items, self.sequence, self.context = input_embeddings(c, D)
        self.item_mlp = mlp(4 * D, c.hidden, D)
        self.user_mlp = mlp(2 * D, c.hidden, D)
        # log q(item): the item's share of training targets, i.e. its chance to appear as an in-batch negative.
        self.register_buffer("item_log_q", torch.zeros(c.n_items))

    @classmethod
    def from_config(cls, d: dict) -> "TwoTower":
        return cls(TwoTowerConfig.from_dict(d))

    def prepare(self, data: dict) -> None:
        """Fills item lookups and log q from the training arrays (see `training.fit.train_loop`).

        `torch.tensor` copies: arrays from the object store are read-only, which `torch.from_numpy` warns about.
        """
        self.items.fill_item_features(data)
        self.set_sampling_log_q(torch.tensor(data["item_counts"]))

    def set_item_features(self, brand: torch.Tensor, category: torch.Tensor, price: torch.Tensor) -> None:
        self.items.set_item_features(brand, category, price)

    def set_sampling_log_q(self, counts: torch.Tensor) -> None:
        """Sets log q from (n_items,) training target counts (add-one smoothed)."""
        q = (counts.double() + 1.0) / (counts.double() + 1.0).sum()
        self.item_log_q.copy_(q.log().float())

    def item_tower(self, item: torch.Tensor, brand: torch.Tensor, category: torch.Tensor,
                   price: torch.Tensor) -> torch.Tensor:
        """(B,) index tensors -> (B, D) unit vectors. item = 0 (unknown) still embeds from its attributes."""
        return F.normalize(self.item_mlp(torch.cat(self.items.explicit_parts(item, brand, category, price), dim=-1)),
                           dim=-1)

    def item_tower_by_index(self, item: torch.Tensor) -> torch.Tensor:
        """(B,) item indices of the bundle's catalog -> (B, D) unit vectors."""
        return F.normalize(self.item_mlp(torch.cat(self.items.parts(item), dim=-1)), dim=-1)

    def user_tower(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
        """Mean-pooled engagements plus context -> (B, D) unit vectors.

        Args:
            hist_items, hist_actions, hist_ages: (B, L) indices, 0 = padding.
            context: (B, C) context indices (`training.data.features.CONTEXT_COLUMNS`).
        """
        pooled = masked_mean(*self.sequence(hist_items, hist_actions, hist_ages))  # (B, D)
        return F.normalize(self.user_mlp(torch.cat([pooled, self.context(context)], dim=-1)), dim=-1)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """In-batch softmax loss for a batch of (user state, engaged item) pairs; returns a scalar."""
        u = self.user_tower(hist_items, hist_actions, hist_ages, context)  # (B, D)
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


USER_ENCODERS = ("transformer", "attention")
TOWER_INPUTS = ("hist_items", "hist_actions", "hist_ages", "context", "target")  # FitSpec.inputs of both towers


@dataclass(frozen=True)
class SeedTwoTowerConfig(TwoTowerConfig):
    user_encoder: str = "transformer"  # or "attention": attention pooling of the tokens, the seed's baseline
    n_layers: int = 1  # the seed allows 1-2; one block, queried at the last position only, trains fastest on CPU
    n_heads: int = 2
    max_len: int = 64  # recency positions; histories are 20 long by default
    neg_fraction: float = 0.0042  # sampled negatives per batch = num_negatives(n_items, neg_fraction)
    in_batch: bool = True  # also use the batch's other targets as negatives (mixed negative sampling)

    def __post_init__(self) -> None:
        if self.user_encoder not in USER_ENCODERS:
            raise ValueError(f"user_encoder must be one of {USER_ENCODERS}, got {self.user_encoder!r}")


class SeedTwoTower(TwoTower):
    """The seed-000 two-tower: a sequence-encoding user tower and a sampled softmax over log-uniform negatives.

    The item tower, the lookups and `item_log_q` (target frequency, the in-batch proposal) are `TwoTower`'s, so
    serving and indexing call it the same way.
    """

    def __init__(self, config: SeedTwoTowerConfig) -> None:
        super().__init__(config)
        c = config
        D = c.dim
        # Only the chosen encoder's parameters exist: DDP fails on parameters that get no gradient.
        if c.user_encoder == "transformer":
            self.position = nn.Embedding(c.max_len, D)
            nn.init.normal_(self.position.weight, std=0.1)
            self.blocks = nn.ModuleList(SelfAttentionBlock(D, c.n_heads) for _ in range(c.n_layers))
        else:
            self.pool_query = nn.Parameter(torch.zeros(D))  # zero starts attention pooling as the mean
        self.sampler = LogUniformSampler(c.n_items)
        self.n_negatives = num_negatives(c.n_items, c.neg_fraction)

    @classmethod
    def from_config(cls, d: dict) -> "SeedTwoTower":
        return cls(SeedTwoTowerConfig.from_dict(d))

    def prepare(self, data: dict) -> None:
        """Item lookups, the in-batch log q and the sampler's popularity ranks from the training arrays."""
        super().prepare(data)
        self.sampler.set_counts(torch.tensor(data["item_counts"]))

    def encode_history(self, hist_items: torch.Tensor, hist_actions: torch.Tensor,
                       hist_ages: torch.Tensor) -> torch.Tensor:
        """(B, L) x3 -> (B, D): transformer output at the most recent position, or attention-pooled tokens."""
        tokens, present = self.sequence(hist_items, hist_actions, hist_ages)  # (B, L, D), (B, L)
        if self.config.user_encoder == "attention":
            scores = tokens @ self.pool_query / tokens.shape[-1] ** 0.5  # (B, L)
            weights = torch.softmax(scores.masked_fill(~present, float("-inf")), dim=-1)
            return torch.nan_to_num(weights).unsqueeze(1).bmm(tokens).squeeze(1)  # empty history -> zeros
        x = tokens + self.position(recency_positions(tokens.shape[1], self.config.max_len, tokens.device))
        allowed = attention_mask(present, causal=False)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only=i == len(self.blocks) - 1)  # only the last position is pooled
        return x[:, -1] * present[:, -1:].float()  # right-aligned: -1 is the latest action; empty history -> zeros

    def user_tower(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
        """Encoded action sequence plus averaged context -> (B, D) unit vectors (USER_INPUTS order)."""
        seq = self.encode_history(hist_items, hist_actions, hist_ages)  # (B, D)
        return F.normalize(self.user_mlp(torch.cat([seq, self.context(context)], dim=-1)), dim=-1)

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Sampled softmax (log-uniform negatives, logQ-corrected, accidental hits masked); returns a scalar."""
        u = self.user_tower(hist_items, hist_actions, hist_ages, context)  # (B, D)
        neg_items, neg_log_q = self.sampler.sample(self.n_negatives)  # (S,), (S,)
        items = self.item_tower_by_index(torch.cat([target, neg_items]))  # one MLP pass for (B + S, D)
        pos, neg = items[:target.shape[0]], items[target.shape[0]:]
        pos_log_q = self.item_log_q[target] if self.config.in_batch else self.sampler.log_q(target)
        return sampled_softmax_loss(u, pos, target, neg, neg_items, self.config.temperature, pos_log_q, neg_log_q,
                                    in_batch=self.config.in_batch)
