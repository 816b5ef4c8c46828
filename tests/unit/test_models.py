"""Two-tower shapes, losses and request-time contracts."""
from __future__ import annotations

import numpy as np
import torch

from training.two_tower import TwoTower, TwoTowerConfig, in_batch_softmax_loss

SIZES = dict(n_items=101, n_brands=11, n_categories=6, n_price_buckets=12, n_countries=4, n_devices=4, n_pages=4,
             n_actions=6, n_ages=24, n_query_buckets=1025)


def _batch(B=8, L=5, seed=0):
    """items, actions, ages (B, L) and a context of B rows with a category and a query token."""
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 101, (B, L), generator=g)
    actions = torch.randint(1, 6, (B, L), generator=g)
    ages = torch.randint(1, 24, (B, L), generator=g)
    ctx = torch.cat([torch.randint(0, 4, (B, 4), generator=g), torch.randint(0, 1025, (B, 4), generator=g)], dim=1)
    return items, actions, ages, ctx


def test_towers_return_unit_vectors_of_the_configured_dimension():
    model = TwoTower(TwoTowerConfig(**SIZES, dim=16))
    u = model.user_tower(*_batch())
    v = model.item_tower_by_index(torch.arange(1, 9))
    assert u.shape == (8, 16) and v.shape == (8, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(8))


def test_padding_positions_do_not_change_the_user_vector():
    model = TwoTower(TwoTowerConfig(**SIZES, dim=16)).eval()
    items, actions, ages, ctx = _batch(B=1)
    pad = torch.zeros(1, 3, dtype=torch.long)
    torch.testing.assert_close(model.user_tower(items, actions, ages, ctx),
                               model.user_tower(*(torch.cat([pad, x], dim=1) for x in (items, actions, ages)), ctx))


def test_in_batch_softmax_is_lower_when_users_point_at_their_own_items_and_masks_duplicates():
    v = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    target = torch.arange(6)
    aligned = in_batch_softmax_loss(v, v, target, 0.1)
    shuffled = in_batch_softmax_loss(v.roll(1, 0), v, target, 0.1)
    assert aligned < shuffled
    dup = torch.tensor([0, 0, 1, 2, 3, 4])  # rows 0 and 1 share an item: neither is the other's negative
    loss = in_batch_softmax_loss(v[dup], v[dup], dup, 0.1)
    assert torch.isfinite(loss)


def test_two_tower_learns_a_user_to_item_association():
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig(**SIZES, dim=16, temperature=0.1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # User state "engaged with item j" -> target item j + 50: a pattern that only training can find.
    hist = torch.arange(1, 41).unsqueeze(1)
    acts = torch.ones_like(hist)
    ctx = torch.zeros(40, 8, dtype=torch.long)
    target = hist.squeeze(1) + 50
    first = model(hist, acts, acts, ctx, target).item()
    for _ in range(150):
        loss = model(hist, acts, acts, ctx, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_logq_correction_subtracts_each_columns_log_sampling_probability():
    torch.manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    target = torch.arange(4)
    log_q = torch.log(torch.tensor([0.7, 0.1, 0.1, 0.1]))
    manual = torch.nn.functional.cross_entropy(u @ v.T / 0.1 - log_q.unsqueeze(0), target)
    torch.testing.assert_close(in_batch_softmax_loss(u, v, target, 0.1, log_q), manual)
    # A popular item stops being over-penalised as a negative: its logit rises relative to rare items.
    assert in_batch_softmax_loss(u, v, target, 0.1, log_q) != in_batch_softmax_loss(u, v, target, 0.1)


def test_sampling_log_q_follows_target_counts():
    model = TwoTower(TwoTowerConfig(**SIZES, dim=8))
    counts = torch.zeros(101)
    counts[5] = 99.0
    model.set_sampling_log_q(counts)
    assert model.item_log_q[5] > model.item_log_q[6]
    torch.testing.assert_close(model.item_log_q.exp().sum(), torch.tensor(1.0))
