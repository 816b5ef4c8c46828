"""Small fixtures shared by the model tests: table sizes, a random request batch, and a full-batch training loop."""
from __future__ import annotations

from collections.abc import Sequence

import torch

SIZES = dict(n_items=101, n_brands=11, n_categories=6, n_price_buckets=12, n_countries=4, n_devices=4, n_pages=4,
             n_actions=6, n_ages=24, n_query_buckets=1025)


def toy_batch(B: int = 8, L: int = 5, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """items, actions, ages (B, L) and a context of B rows with a category and a query token."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 101, (B, L), generator=g)
    actions = torch.randint(1, 6, (B, L), generator=g)
    ages = torch.randint(1, 24, (B, L), generator=g)
    ctx = torch.cat([torch.randint(0, 4, (B, 4), generator=g), torch.randint(0, 1025, (B, 4), generator=g)], dim=1)
    return items, actions, ages, ctx


def fit_full_batch(model: torch.nn.Module, inputs: Sequence[torch.Tensor], steps: int, lr: float) -> float:
    """Adam on the same batch `steps` times (model(*inputs) returns the loss); returns the last loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(*inputs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()
