"""Negative sampling for retrieval training: a log-uniform (Zipf) sampler over popularity ranks and a sampled softmax.

Follows the sampled softmax of Jean et al. (2015) as implemented by TensorFlow's `sampled_softmax_loss` (log-uniform
candidate sampler, logits corrected by the log expected count of each candidate, accidental hits removed), mixed with
the in-batch negatives of Yi et al. (RecSys 2019) and Yang et al., "Mixed Negative Sampling" (WWW 2020).

Why the correction: a softmax over a *sampled* candidate set is a biased estimate of the full softmax unless each
candidate's logit is lowered by log(expected count of that candidate in the set). Without it popular items, which are
drawn as negatives more often, are pushed down: the model learns p(item | user) / q(item) instead of p(item | user).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def num_negatives(n_items: int, fraction: float = 0.0042, floor: int = 64, cap: int = 4096) -> int:
    """Number of shared sampled negatives per batch: `fraction` of the catalog, clipped to [floor, cap].

    0.42% follows the seed-000 setting (about 4k negatives for a 1M-item catalog); the floor keeps small catalogs
    from training against a handful of negatives, the cap bounds the (B, S) logit matrix.
    """
    if n_items < 2:
        raise ValueError(f"n_items must be >= 2 (padding row + at least one item), got {n_items}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if floor < 1 or cap < floor:
        raise ValueError(f"need 1 <= floor <= cap, got floor={floor}, cap={cap}")
    return int(min(cap, max(floor, round(fraction * n_items))))


class LogUniformSampler(nn.Module):
    """Zipf / log-uniform over popularity rank: P(rank r) = (log(r + 2) - log(r + 1)) / log(n + 1), r = 0 most popular.

    n = n_items - 1 real items (row 0 is padding and never sampled). The probabilities telescope to 1. Drawing is
    O(1) per sample by inverting the CDF: with u ~ U[0, 1), r = floor(exp(u * log(n + 1))) - 1 has exactly that law.
    All state lives in buffers, so the sampler moves with its model (`.to(device)`) and is saved in its state_dict.
    """

    def __init__(self, n_items: int) -> None:
        super().__init__()
        if n_items < 2:
            raise ValueError(f"n_items must be >= 2 (padding row + at least one item), got {n_items}")
        self.n_items = n_items
        n = n_items - 1
        r = torch.arange(n, dtype=torch.float64)
        log_p_rank = (torch.log(r + 2.0) - torch.log(r + 1.0)).log() - math.log(math.log(n + 1.0))  # (n,)
        self.register_buffer("log_p_rank", log_p_rank.float())
        # Until counts arrive, rank follows the item index (item 1 is rank 0).
        self.register_buffer("rank_to_item", torch.arange(1, n_items, dtype=torch.long))  # (n,)
        self.register_buffer("item_log_q", torch.empty(n_items))  # (n_items,) log P(one draw = item)
        self._refresh_item_log_q()

    def set_counts(self, counts: torch.Tensor) -> None:
        """Ranks items by (n_items,) training counts, most counted first; ties keep index order. counts[0] is ignored."""
        if counts.shape != (self.n_items,):
            raise ValueError(f"counts must have shape ({self.n_items},), got {tuple(counts.shape)}")
        c = counts[1:].to(torch.float64).cpu()
        order = torch.sort(-c, stable=True).indices + 1  # (n,) item index at each rank
        self.rank_to_item.copy_(order.to(self.rank_to_item.device))
        self._refresh_item_log_q()

    def _refresh_item_log_q(self) -> None:
        log_q = torch.empty(self.n_items, device=self.log_p_rank.device)
        log_q[self.rank_to_item] = self.log_p_rank
        log_q[0] = self.log_p_rank[-1]  # padding is never drawn; a finite value keeps a padded target from making inf
        self.item_log_q.copy_(log_q)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws n items with replacement.

        Returns:
            items: (n,) int64 item indices in 1..n_items-1.
            log_q: (n,) log probability of one draw returning that item (not the expected count: multiply by the number
                of draws, as `sampled_softmax_loss` does, to get the expected count).
        """
        n_real = self.n_items - 1
        device = self.rank_to_item.device
        u = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        ranks = (torch.exp(u * math.log(n_real + 1.0)).floor().long() - 1).clamp_(0, n_real - 1)  # (n,)
        items = self.rank_to_item[ranks]
        return items, self.log_p_rank[ranks]

    def log_q(self, items: torch.Tensor) -> torch.Tensor:
        """(...) item indices -> (...) log probability of one draw returning each item."""
        return self.item_log_q[items]


def sampled_softmax_loss(user: torch.Tensor, pos: torch.Tensor, pos_items: torch.Tensor, neg: torch.Tensor,
                         neg_items: torch.Tensor, temperature: float, pos_log_q: torch.Tensor,
                         neg_log_q: torch.Tensor, in_batch: bool = False) -> torch.Tensor:
    """Mean cross-entropy of each row's positive against shared sampled negatives (and optionally in-batch ones).

    Logits are dot products over `temperature`, lowered by the log expected count of each candidate in the candidate
    set. The inputs are log probabilities of ONE draw; the expected count adds log(number of draws): log(S) for the
    S sampled negatives and log(B) for the B in-batch positives. The constant cancels within one source but matters
    when two sources are mixed. A negative equal to the row's positive (an accidental hit) is masked out.

    Args:
        user: (B, D) user vectors.
        pos: (B, D) target item vectors; pos_items: (B,) their indices.
        neg: (S, D) sampled negative vectors shared by all rows; neg_items: (S,) their indices.
        temperature: logit scale (dot product / temperature).
        pos_log_q: (B,) log q of each positive under the distribution that proposes it as a candidate: the sampler's
            q when in_batch=False (TF convention: the true class is corrected like a sampled one), the in-batch
            (training-target frequency) q when in_batch=True.
        neg_log_q: (S,) log q of each sampled negative under the sampler.
        in_batch: also use the other rows' positives as negatives (with pos_log_q).

    Returns:
        () scalar mean loss.
    """
    B, S = user.shape[0], neg.shape[0]
    if pos.shape != user.shape or pos_items.shape != (B,) or pos_log_q.shape != (B,):
        raise ValueError(f"pos/pos_items/pos_log_q must be ({B}, D)/({B},)/({B},), got "
                         f"{tuple(pos.shape)}/{tuple(pos_items.shape)}/{tuple(pos_log_q.shape)}")
    if neg.shape[1:] != user.shape[1:] or neg_items.shape != (S,) or neg_log_q.shape != (S,):
        raise ValueError(f"neg/neg_items/neg_log_q must be (S, {user.shape[1]})/(S,)/(S,), got "
                         f"{tuple(neg.shape)}/{tuple(neg_items.shape)}/{tuple(neg_log_q.shape)}")
    neg_logits = user @ neg.T / temperature - (neg_log_q + math.log(S)).unsqueeze(0)  # (B, S)
    neg_logits = neg_logits.masked_fill(neg_items.unsqueeze(0) == pos_items.unsqueeze(1), float("-inf"))
    if in_batch:
        batch_logits = user @ pos.T / temperature - (pos_log_q + math.log(B)).unsqueeze(0)  # (B, B), diagonal = pos
        same = pos_items.unsqueeze(0) == pos_items.unsqueeze(1)  # (B, B) another row holds the same item
        same.fill_diagonal_(False)
        logits = torch.cat([batch_logits.masked_fill(same, float("-inf")), neg_logits], dim=1)  # (B, B + S)
        labels = torch.arange(B, device=user.device)
    else:
        pos_logits = (user * pos).sum(-1, keepdim=True) / temperature - (pos_log_q + math.log(S)).unsqueeze(1)  # (B, 1)
        logits = torch.cat([pos_logits, neg_logits], dim=1)  # (B, 1 + S)
        labels = torch.zeros(B, dtype=torch.long, device=user.device)
    return F.cross_entropy(logits, labels)


def full_softmax_loss(user: torch.Tensor, items: torch.Tensor, pos_items: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """Mean cross-entropy of each row's positive against every item of the catalog (no sampling, no correction).

    The loss SASRec+ (Klenitskiy & Vasilev, "Turning Dross Into Gold Loss: is BERT4Rec really better than SASRec?",
    RecSys 2023) found to matter most: against all items, not one sampled negative. It costs a (B, n_items) logit
    matrix, so callers use it where the catalog allows (`SASRecConfig.loss`).

    Args:
        user: (B, D) user vectors. items: (n_items, D) every item's vector, row 0 = padding (never a class).
        pos_items: (B,) target indices in 1..n_items-1.
    """
    logits = user @ items.T / temperature  # (B, n_items)
    logits[:, 0] = float("-inf")
    return F.cross_entropy(logits, pos_items)


def gbce_beta(n_negatives: int, n_items: int, t: float) -> float:
    """gSASRec's beta = alpha * (t * (1 - 1/alpha) + 1/alpha), alpha = negatives / (items - 1) (the sampling rate).

    t = 0 gives beta = 1 (plain BCE, overconfident on popular items under few negatives); t = 1 gives beta = alpha,
    which calibrates the positive term to the full-catalog probability.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"gbce t must be in [0, 1], got {t}")
    alpha = n_negatives / max(n_items - 1, 1)
    return alpha * (t * (1.0 - 1.0 / alpha) + 1.0 / alpha)


def gbce_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalised binary cross-entropy of gSASRec (Petrov & Macdonald, RecSys 2023), mean over positives.

    loss = -log(sigmoid(s+) ** beta) - sum_j log(1 - sigmoid(s-_j)).

    Args:
        pos_logits: (B,) scores of the positives. neg_logits: (B, k) scores of each row's k uniform negatives.
        beta: `gbce_beta(k, n_items, t)`.
    """
    return (-beta * F.logsigmoid(pos_logits) - F.logsigmoid(-neg_logits).sum(-1)).mean()
