"""SASRec-style sequential retrieval: causal self-attention over the engagement sequence, next-item prediction.

Follows Kang & McAuley, "Self-Attentive Sequential Recommendation" (ICDM 2018): item tokens plus learned positions,
pre-LN causal transformer blocks, and the output at each position scored against the *shared* item embeddings
(here the sum of item id, brand, category and price tables, so rare items borrow from their attributes). The paper's
one-negative BCE learns slowly; the loss at every position is one of (`SASRecConfig.loss`, `training.models.sampling`):

- "full": cross-entropy over the whole catalog (SASRec+, Klenitskiy & Vasilev 2023; the strongest in their study);
- "sampled": sampled softmax with log-uniform negatives and logQ correction (what scales to a 1M-item catalog);
- "gbce": gSASRec's generalised BCE over k uniform negatives per position (Petrov & Macdonald 2023);
- "auto": "full" up to `FULL_SOFTMAX_MAX_ITEMS` items, else "sampled".

The self-attention block and its mask live in `training.models.blocks`, shared with the seed-000 user tower.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn

from training.models.blocks import SelfAttentionBlock, attention_mask, recency_positions
from training.models.embeddings import ItemEmbedding, _table
from training.data.features import Engagements
from training.models.sampling import (LogUniformSampler, full_softmax_loss, gbce_beta, gbce_loss, num_negatives,
                                      sampled_softmax_loss)

SEQUENCE_INPUTS = ("seq_items", "seq_actions", "seq_targets")  # FitSpec.inputs of SASRec
LOSSES = ("auto", "full", "sampled", "gbce")
# "auto" takes the full softmax up to this catalog size: a batch's ~2,500 target positions x 20k items is a 200 MB
# logit matrix (and as much for its gradient) per worker, which a laptop still holds; MovieLens-1M has 3.7k items.
FULL_SOFTMAX_MAX_ITEMS = 20_000


@dataclass(frozen=True)
class SASRecConfig:
    n_items: int  # table sizes include the padding row 0
    n_brands: int
    n_categories: int
    n_price_buckets: int
    n_actions: int
    dim: int = 64  # the same width as the two-tower, so both fit the same 64-float index
    n_layers: int = 2  # the paper's setting
    n_heads: int = 2
    max_len: int = 50  # positions counted from the most recent token; longer inputs share the last position
    dropout: float = 0.1  # lighter than the paper's 0.2: the synthetic shop has more data per item than ML-1M
    neg_fraction: float = 0.0042  # negatives = num_negatives(n_items, neg_fraction)
    temperature: float = 1.0  # raw dot products, as in the paper; the output LayerNorm bounds their scale
    loss: str = "auto"  # one of LOSSES (module docstring)
    gbce_negatives: int = 256  # uniform negatives per position under "gbce" (the gSASRec paper's setting)
    gbce_t: float = 0.75  # gSASRec's calibration t (their best on ML-1M)

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"SASRec loss must be one of {list(LOSSES)}, got {self.loss!r}")

    @property
    def effective_loss(self) -> str:
        """The loss "auto" resolves to for this catalog."""
        if self.loss != "auto":
            return self.loss
        return "full" if self.n_items <= FULL_SOFTMAX_MAX_ITEMS else "sampled"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SASRecConfig":
        return cls(**d)


class SASRec(nn.Module):
    """Causal transformer over (item, action) tokens; the last position's output is the user vector."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        D = c.dim
        self.items = ItemEmbedding(c.n_items, c.n_brands, c.n_categories, c.n_price_buckets, D)
        self.action = _table(c.n_actions, D)
        self.position = nn.Embedding(c.max_len, D)
        nn.init.normal_(self.position.weight, std=0.1)
        self.blocks = nn.ModuleList(SelfAttentionBlock(D, c.n_heads, c.dropout) for _ in range(c.n_layers))
        self.ln = nn.LayerNorm(D)
        self.drop = nn.Dropout(c.dropout)
        self.sampler = LogUniformSampler(c.n_items)
        self.n_negatives = num_negatives(c.n_items, c.neg_fraction)

    @classmethod
    def from_config(cls, d: dict) -> "SASRec":
        return cls(SASRecConfig.from_dict(d))

    def prepare(self, data: dict[str, np.ndarray]) -> None:
        """Fills item lookups and the sampler's popularity ranks from the training arrays (`item_counts`)."""
        self.items.fill_item_features(data)
        self.sampler.set_counts(torch.tensor(data["item_counts"]))

    def encode(self, seq_items: torch.Tensor, seq_actions: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """(B, L) right-aligned items and actions -> (B, L, D): position i summarises tokens 0..i.

        With `last_only`, (B, 1, D): the final block computes the most recent position only.
        """
        L = seq_items.shape[1]
        present = seq_actions > 0
        x = self.items.summed(seq_items) + self.action(seq_actions)
        x = self.drop(x + self.position(recency_positions(L, self.config.max_len, x.device)))  # (B, L, D)
        allowed = attention_mask(present, causal=True)
        for i, block in enumerate(self.blocks):
            x = block(x, allowed, last_only=last_only and i == len(self.blocks) - 1)
        return self.ln(x)

    def item_tower(self, item: torch.Tensor, brand: torch.Tensor, category: torch.Tensor,
                   price: torch.Tensor) -> torch.Tensor:
        """(B,) indices -> (B, D): the shared scoring embedding; item = 0 (new item) embeds from its attributes."""
        return torch.stack(self.items.explicit_parts(item, brand, category, price)).sum(0)

    def item_tower_by_index(self, item: torch.Tensor) -> torch.Tensor:
        """(B,) item indices -> (B, D)."""
        return self.items.summed(item)

    def user_tower(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                   context: torch.Tensor) -> torch.Tensor:
        """USER_INPUTS -> (B, D), the output at the most recent position. Ages and context are not used: SASRec
        reads the order of the sequence only."""
        return self.encode(hist_items, hist_actions, last_only=True)[:, -1]

    def forward(self, seq_items: torch.Tensor, seq_actions: torch.Tensor, seq_targets: torch.Tensor) -> torch.Tensor:
        """Next-item loss (`SASRecConfig.loss`) over every position with a target; returns a scalar.

        Args:
            seq_items, seq_actions: (B, L) right-aligned inputs.
            seq_targets: (B, L) the item engaged after each position, 0 where there is none.
        """
        h = self.encode(seq_items, seq_actions)  # (B, L, D)
        valid = seq_targets > 0
        user, pos_items = h[valid], seq_targets[valid]  # (N, D), (N,)
        c = self.config
        loss = c.effective_loss
        if loss == "full":
            return full_softmax_loss(user, self.items.summed(torch.arange(c.n_items, device=user.device)), pos_items,
                                     c.temperature)
        if loss == "gbce":
            k = min(c.gbce_negatives, c.n_items - 2)
            neg_items = torch.randint(1, c.n_items, (len(pos_items), k), device=user.device)  # uniform, per position
            pos_logits = (user * self.items.summed(pos_items)).sum(-1) / c.temperature
            neg_logits = torch.einsum("nd,nkd->nk", user, self.items.summed(neg_items)) / c.temperature
            neg_logits = neg_logits.masked_fill(neg_items == pos_items.unsqueeze(1), float("-inf"))  # accidental hits
            return gbce_loss(pos_logits, neg_logits, gbce_beta(k, c.n_items - 1, c.gbce_t))
        neg_items, neg_log_q = self.sampler.sample(self.n_negatives)
        return sampled_softmax_loss(user, self.items.summed(pos_items), pos_items, self.items.summed(neg_items),
                                    neg_items, self.config.temperature, self.sampler.log_q(pos_items), neg_log_q)


def sequence_windows(eng: Engagements, length: int) -> dict[str, np.ndarray]:
    """Every user's engagement sequence cut into right-aligned training windows for `SASRec.forward`.

    Consecutive engagements with one item (view -> cart -> purchase) collapse to one token with the last action,
    and a target the user engaged with before is masked: the evaluation excludes seen items, so predicting a repeat
    teaches nothing it rewards. Windows of `length` targets end at the sequence's end and step back by `length`, so
    each transition is a target exactly once.

    Returns:
        seq_items, seq_actions, seq_targets: each (n_windows, length) int64, 0 = padding / no target.
    """
    keep = np.ones(len(eng.item_idx), dtype=bool)
    same_next = (eng.user_code[1:] == eng.user_code[:-1]) & (eng.item_idx[1:] == eng.item_idx[:-1])
    keep[:-1] = ~same_next  # keep the last of a run of one item
    user, item, action = eng.user_code[keep], eng.item_idx[keep], eng.action[keep]
    pair = user * (int(item.max(initial=0)) + 1) + item
    first_time = np.zeros(len(item), dtype=bool)
    first_time[np.unique(pair, return_index=True)[1]] = True  # the user's first engagement with the item
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, dtype=np.int64)
    counts = np.diff(np.r_[starts, len(user)])
    n_win = np.maximum(counts - 1 + length - 1, 0) // length  # ceil((count - 1) / length) windows per user
    u = np.repeat(np.arange(len(starts)), n_win)
    k = np.arange(n_win.sum()) - np.repeat(np.cumsum(n_win) - n_win, n_win)  # window number within its user
    end = starts[u] + counts[u] - k * length  # exclusive global end of the window's targets
    t_idx = end[:, None] - np.arange(length, 0, -1)[None, :]  # (n, L) global index of each target
    valid = t_idx >= starts[u][:, None] + 1  # a target needs a token before it
    i_idx = np.where(valid, t_idx - 1, 0)
    t_idx = np.where(valid, t_idx, 0)
    seq_items = np.where(valid, item[i_idx], 0)
    seq_actions = np.where(valid, action[i_idx], 0)
    targets = np.where(valid, item[t_idx], 0)
    targets[~first_time[t_idx]] = 0
    return {"seq_items": seq_items.astype(np.int64), "seq_actions": seq_actions.astype(np.int64),
            "seq_targets": targets.astype(np.int64)}
