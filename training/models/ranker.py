"""The seed-000 ranker: a transformer over the action sequence, target attention per candidate, one head per task.

Inputs: the request context (averaged field embeddings), the action sequence (item, action type and age tokens,
`training.models.embeddings.SequenceEmbedding`) and the candidate's features (id, brand, category, price). The context is
the first token of the sequence, so a user without history still has one token to attend to. A transformer encoder
runs once per request over (context, history); each candidate then attends over the encoded tokens (target-aware
attention, as in DIN, Zhou et al. 2018, over a transformer encoding, as in BST, Chen et al. 2019), which is a cheap
per-candidate step, so 500 candidates cost one encoder pass plus one batched attention and MLP.

Heads: one logit per task in `TASKS`, each a sigmoid trained with binary cross-entropy, weighted per task in the
loss (`loss_weights`); the ordering score is the `task_weights`-weighted sum of probabilities.

Retrieval's score as a feature (`retrieval_feature`): the ranker re-orders retrieval's candidates, so it sees what
retrieval thought of each one: the dot product of the version's user and item towers, standardised with the training
data's mean and spread. It enters the head beside the learned features and as a direct per-task linear logit, so
the ranker can keep retrieval's order where it has nothing better and correct it where the sequence and the context
say more. Trained on retrieval's own candidates as negatives (`training.fit.ranker_data`), this is the classic
two-stage set-up where the second stage learns from what the first one brings.

Position debiasing (the shallow tower of PAL, Guo et al. 2019 / YouTube's "Recommending what video to watch next"):
in training, the logged display position adds a per-task logit from a shallow position tower; the position is
dropped (set to "unknown") for a share of examples so the main model is never a function of it. At serving the
position term is left out, which is the neutral value: the score estimates relevance as if every item were examined.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from training.models.embeddings import input_embeddings
from training.data.examples import TASKS
from training.data.features import TableSizes



@dataclass(frozen=True)
class RankerConfig(TableSizes):
    dim: int = 32  # token width: 500 candidates x 50 history tokens at 32 score in ~1 ms (p50) on one core
    heads: int = 2
    layers: int = 1  # one layer mixes the context into every action; more layers cost latency linearly
    ffn: int = 64
    hidden: int = 128
    dropout: float = 0.1
    # Position buckets: 0 = unknown, 1..n-2 = display positions 0..n-3, n-1 = anything lower on the page.
    n_positions: int = 22
    position_debias: bool = True  # False trains the same model without the position tower (the ablation)
    # Share of training examples whose position is hidden from the position tower. Small: on a hidden row the main
    # model must absorb the average examination of the item, which re-imports the logging policy's bias.
    position_dropout: float = 0.1
    # Weights of the per-task probabilities in the ordering score; purchase counts most because it is the
    # business outcome, click least because it is the cheapest signal.
    task_weights: tuple[float, ...] = field(default=(1.0, 0.5, 1.0, 2.0))
    # Weights of the per-task losses; equal by default, raise one to spend more capacity on that task.
    loss_weights: tuple[float, ...] = field(default=(1.0, 1.0, 1.0, 1.0))
    # The candidate's retrieval score (user tower . item tower of the version's retrieval model) as an input; the
    # model then needs `retrieval_score` in training and at serving. False: the ranker of bundles before it.
    retrieval_feature: bool = False

    def __post_init__(self) -> None:
        for name in ("task_weights", "loss_weights"):
            w = getattr(self, name)
            if len(w) != len(TASKS) or min(w) < 0:
                raise ValueError(f"RankerConfig.{name} must be {len(TASKS)} non-negative weights for {TASKS}, got {w}")
        if self.dim % self.heads:
            raise ValueError(f"RankerConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.position_dropout <= 1.0:
            raise ValueError(f"RankerConfig.position_dropout must be in [0, 1], got {self.position_dropout}")

    @classmethod
    def from_dict(cls, d: dict) -> "RankerConfig":
        d = dict(d)
        for name in ("task_weights", "loss_weights"):
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)


class EncodedUser(NamedTuple):
    """A request's user side, computed once and shared by its candidates."""

    summary: torch.Tensor  # (B, D) the encoded context token
    keys: torch.Tensor  # (B, L + 1, D) projected tokens for target attention
    values: torch.Tensor  # (B, L + 1, D)
    mask: torch.Tensor  # (B, L + 1) bool, True where a token is present (the context token always is)


def position_bucket(position: torch.Tensor, n_positions: int) -> torch.Tensor:
    """(B,) logged 0-based positions (-1 = unknown) -> buckets 0..n_positions-1 (0 = unknown)."""
    return torch.where(position < 0, torch.zeros_like(position), (position + 1).clamp(max=n_positions - 1))


class MultiTaskRanker(nn.Module):
    """Scores (user state, candidate) pairs for every task in `TASKS`."""

    TRAIN_INPUTS = ("hist_items", "hist_actions", "hist_ages", "context", "item", "position", "labels")

    @classmethod
    def train_inputs(cls, config: RankerConfig) -> tuple[str, ...]:
        """The data arrays `forward` takes, in order, for a model of this config."""
        return cls.TRAIN_INPUTS + (("retrieval_score",) if config.retrieval_feature else ())

    def __init__(self, config: RankerConfig) -> None:
        super().__init__()
        c = self.config = config
        D = c.dim
        self.items, self.sequence, self.context = input_embeddings(c, D)
        layer = nn.TransformerEncoderLayer(D, c.heads, c.ffn, c.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(D)
        self.key = nn.Linear(D, D, bias=False)
        self.value = nn.Linear(D, D, bias=False)
        self.item_proj = nn.Linear(4 * D, D)
        self.query = nn.Linear(D, D, bias=False)
        # Input: user summary, target-attended history, candidate, and attended * candidate (explicit interaction).
        extra = 1 if c.retrieval_feature else 0  # the standardised retrieval score
        self.head = nn.Sequential(nn.Linear(4 * D + extra, c.hidden), nn.GELU(), nn.Dropout(c.dropout),
                                  nn.Linear(c.hidden, len(TASKS)))
        if c.retrieval_feature:
            self.retrieval_logit = nn.Linear(1, len(TASKS))  # the direct path: a monotone use of retrieval's order
            self.register_buffer("retrieval_mean", torch.zeros(()))
            self.register_buffer("retrieval_std", torch.ones(()))
        if c.position_debias:
            # Shallow on purpose: a position embedding and a linear map, no bias, so "unknown" adds exactly zero.
            self.position = nn.Sequential(nn.Embedding(c.n_positions, 8, padding_idx=0), nn.Dropout(c.dropout),
                                          nn.Linear(8, len(TASKS), bias=False))
        self.register_buffer("task_weights", torch.tensor(c.task_weights, dtype=torch.float32))
        self.register_buffer("loss_weights", torch.tensor(c.loss_weights, dtype=torch.float32))

    @classmethod
    def from_config(cls, d: dict) -> "MultiTaskRanker":
        return cls(RankerConfig.from_dict(d))

    def prepare(self, data: dict) -> None:
        """Fills the item lookups from the training arrays (see `training.fit.train_loop`), and with the retrieval
        feature the mean and spread its scores are standardised with."""
        self.items.fill_item_features(data)
        if self.config.retrieval_feature:
            self.prepare_retrieval_statistics(data)

    def prepare_retrieval_statistics(self, data: dict) -> None:
        """The mean and spread the retrieval scores are standardised with (any model with those buffers)."""
        if "retrieval_score" not in data:
            raise ValueError("a ranker with retrieval_feature needs a 'retrieval_score' array to train on")
        s = np.asarray(data["retrieval_score"], dtype=np.float64)
        self.retrieval_mean.fill_(float(s.mean()) if len(s) else 0.0)
        self.retrieval_std.fill_(max(float(s.std()), 1e-6) if len(s) else 1.0)

    def set_item_features(self, brand: torch.Tensor, category: torch.Tensor, price: torch.Tensor) -> None:
        self.items.set_item_features(brand, category, price)

    def encode_user(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                    context: torch.Tensor) -> EncodedUser:
        """(B, L) x3, (B, C) -> the encoded request: one transformer pass over (context, history)."""
        tokens, mask = self.sequence(hist_items, hist_actions, hist_ages)  # (B, L, D), (B, L)
        ctx = self.context(context).unsqueeze(1)  # (B, 1, D)
        x = torch.cat([ctx, tokens], dim=1)  # (B, L + 1, D)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # (B, L + 1)
        h = self.norm(self.encoder(x, src_key_padding_mask=~mask))  # (B, L + 1, D)
        return EncodedUser(h[:, 0], self.key(h), self.value(h), mask)

    def encode_items(self, item: torch.Tensor) -> torch.Tensor:
        """(...,) item indices -> (..., D)."""
        return self.item_proj(torch.cat(self.items.parts(item), dim=-1))

    def score(self, user: EncodedUser, items: torch.Tensor,
              retrieval_score: torch.Tensor | None = None) -> torch.Tensor:
        """Task logits without any position term (the serving score).

        Args:
            user: B encoded requests.
            items: (B, M) candidates of each request, or (B,) one candidate per request.
            retrieval_score: the candidates' retrieval scores, shaped like `items`; required with
                `retrieval_feature`, ignored without it.
        Returns:
            (B, M, T) logits, or (B, T) for (B,) items.
        """
        one = items.dim() == 1
        items = items.unsqueeze(1) if one else items  # (B, M)
        v = self.encode_items(items)  # (B, M, D)
        att = self.query(v) @ user.keys.transpose(1, 2) / self.config.dim ** 0.5  # (B, M, L + 1)
        att = att.masked_fill(~user.mask.unsqueeze(1), float("-inf")).softmax(-1)
        pooled = att @ user.values  # (B, M, D): the history as seen from each candidate
        summary = user.summary.unsqueeze(1).expand_as(v)  # (B, M, D), a view: no copy per candidate
        parts = [summary, pooled, v, pooled * v]
        if self.config.retrieval_feature:
            if retrieval_score is None:
                raise ValueError("this ranker was trained with retrieval_feature: pass the candidates' "
                                 "retrieval_score")
            s = retrieval_score.to(v.dtype).reshape(items.shape).unsqueeze(-1)  # (B, M, 1)
            s = (s - self.retrieval_mean) / self.retrieval_std
            parts.append(s)
        logits = self.head(torch.cat(parts, dim=-1))  # (B, M, T)
        if self.config.retrieval_feature:
            logits = logits + self.retrieval_logit(s)
        return logits[:, 0] if one else logits

    def logits(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
               context: torch.Tensor, item: torch.Tensor, retrieval_score: torch.Tensor | None = None) -> torch.Tensor:
        """(N, L) x3, (N, C), (N,) one impression per row -> (N, T) serving logits."""
        return self.score(self.encode_user(hist_items, hist_actions, hist_ages, context), item, retrieval_score)

    scored_logits = logits  # the name every ranking model shares (`training.models.rank_baselines`)

    def position_logits(self, position: torch.Tensor) -> torch.Tensor:
        """(N,) logged positions -> (N, T) additive training-only logits (zeros without the position tower)."""
        if not self.config.position_debias:
            return torch.zeros(len(position), len(TASKS), device=position.device)
        bucket = position_bucket(position, self.config.n_positions)
        if self.training:  # hide the position for a share of rows, so the tower never carries the whole signal
            keep = torch.rand(bucket.shape, device=bucket.device) >= self.config.position_dropout
            bucket = bucket * keep
        return self.position(bucket)

    def combined(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., T) logits -> (...,) ordering score: task-weighted sum of probabilities."""
        return torch.sigmoid(logits) @ self.task_weights

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(N, T) logits and labels -> scalar: per-task mean BCE, averaged with `loss_weights`."""
        per_task = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(0)  # (T,)
        return (per_task * self.loss_weights).sum() / self.loss_weights.sum()

    def forward(self, hist_items: torch.Tensor, hist_actions: torch.Tensor, hist_ages: torch.Tensor,
                context: torch.Tensor, item: torch.Tensor, position: torch.Tensor,
                labels: torch.Tensor, retrieval_score: torch.Tensor | None = None) -> torch.Tensor:
        """Training loss for (B,) impressions (`train_inputs`): (B, T) labels, position -1 when not logged."""
        logits = (self.logits(hist_items, hist_actions, hist_ages, context, item, retrieval_score)
                  + self.position_logits(position))
        return self.loss(logits, labels)


@torch.inference_mode()
def score_candidates(model: MultiTaskRanker, hist_items: np.ndarray, hist_actions: np.ndarray, hist_ages: np.ndarray,
                     context: np.ndarray, candidates: list[np.ndarray],
                     retrieval_scores: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Ordering scores for several requests' candidate lists in one forward pass, without the position term.

    Each request's history is encoded once and shared by all its candidates; the lists are padded to one (B, M)
    batch, so candidate attention is one batched matmul per request rather than a copy of the history per candidate.

    Args:
        hist_items, hist_actions, hist_ages: (B, L) per request; context: (B, C).
        candidates: B arrays of item indices, any lengths.
        retrieval_scores: B arrays aligned with `candidates` (a ranker with `retrieval_feature` needs them).
    Returns:
        B float32 arrays of combined scores, aligned with `candidates`.
    """
    if len(candidates) != len(hist_items):
        raise ValueError(f"candidates: {len(candidates)} lists for {len(hist_items)} requests")
    user = model.encode_user(*(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
                               for a in (hist_items, hist_actions, hist_ages, context)))  # once per request
    lengths = [len(c) for c in candidates]
    items = np.zeros((len(candidates), max(lengths, default=0)), dtype=np.int64)  # (B, M), padded with item 0
    for r, c in enumerate(candidates):
        items[r, :len(c)] = c
    rs = None
    if retrieval_scores is not None:
        if [len(s) for s in retrieval_scores] != lengths:
            raise ValueError("retrieval_scores: each list must be as long as its candidates")
        rs = np.zeros(items.shape, dtype=np.float32)
        for r, s in enumerate(retrieval_scores):
            rs[r, :len(s)] = s
        rs = torch.from_numpy(rs)
    scores = model.combined(model.score(user, torch.from_numpy(items), rs)).numpy()  # (B, M)
    return [scores[r, :n] for r, n in enumerate(lengths)]
