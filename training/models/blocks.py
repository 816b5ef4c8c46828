"""Building blocks shared by the models: the pre-LN self-attention block with its mask and recency positions, and
the two-layer MLP of the towers."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU -> Linear: the towers' head over concatenated embeddings."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


def attention_mask(present: torch.Tensor, causal: bool) -> torch.Tensor:
    """(B, L) bool -> (B, 1, L, L) bool, True where query i may attend to key j.

    Keys must be present tokens (and j <= i when causal); every query may always attend to itself, so a row of
    padding never has an empty softmax (which would give NaN); those rows' outputs are ignored or, for an empty
    history, give a learned "no history" vector.
    """
    L = present.shape[1]
    eye = torch.eye(L, dtype=torch.bool, device=present.device)
    allowed = present[:, None, None, :] | eye  # (B, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=present.device).tril()
    return allowed


class SelfAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + MHA(LN(x)), then x + FFN(LN(x)).

    `last_only` computes the output of the last position alone (keys and values still cover every token): a user
    tower pooled at the last position needs nothing else from its final block, and skipping the other L - 1 queries
    and their feed-forward passes makes a one-block tower ~3x faster to train on CPU.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, ff_mult: int = 2) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by n_heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim),
                                nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x (B, L, D), allowed (B, 1, L, L) bool -> (B, L, D), or (B, 1, D) with `last_only`."""
        B, L, D = x.shape
        h = self.ln1(x)
        if last_only:
            x, allowed = x[:, -1:], allowed[:, :, -1:]  # (B, 1, D), (B, 1, 1, L)
        Lq = x.shape[1]
        k, v = self.kv(h).split(D, dim=-1)
        q = self.q(h[:, -Lq:])
        q = q.view(B, Lq, self.heads, D // self.heads).transpose(1, 2)  # (B, nh, Lq, hs)
        k, v = (t.view(B, L, self.heads, D // self.heads).transpose(1, 2) for t in (k, v))  # (B, nh, L, hs)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, nh, Lq, hs)
        x = x + self.proj(y.transpose(1, 2).reshape(B, Lq, D))
        return x + self.ff(self.ln2(x))


def recency_positions(L: int, max_len: int, device: torch.device) -> torch.Tensor:
    """(L,) position ids counted from the right (the most recent token is 0): right-aligned histories of any
    length L share their recent positions between training and serving."""
    return torch.arange(L - 1, -1, -1, device=device).clamp(max=max_len - 1)
