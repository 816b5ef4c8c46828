"""Two-tower shapes, losses and request-time contracts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, fit_full_batch, toy_batch
from training.models.two_tower import TwoTower, TwoTowerConfig, in_batch_softmax_loss


def test_towers_return_unit_vectors_of_the_configured_dimension():
    model = TwoTower(TwoTowerConfig(**SIZES, dim=16))
    u = model.user_tower(*toy_batch())
    v = model.item_tower_by_index(torch.arange(1, 9))
    assert u.shape == (8, 16) and v.shape == (8, 16)
    torch.testing.assert_close(u.norm(dim=-1), torch.ones(8))
    torch.testing.assert_close(v.norm(dim=-1), torch.ones(8))


def test_padding_positions_do_not_change_the_user_vector():
    model = TwoTower(TwoTowerConfig(**SIZES, dim=16)).eval()
    items, actions, ages, ctx = toy_batch(B=1)
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
    # User state "engaged with item j" -> target item j + 50: a pattern that only training can find.
    hist = torch.arange(1, 41).unsqueeze(1)
    acts = torch.ones_like(hist)
    ctx = torch.zeros(40, 8, dtype=torch.long)
    target = hist.squeeze(1) + 50
    first = model(hist, acts, acts, ctx, target).item()
    assert fit_full_batch(model, (hist, acts, acts, ctx, target), 150, 1e-2) < 0.3 * first


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


# --- SeedTwoTower (seed 000): sequence-encoding user tower, log-uniform sampled softmax -------------------------

from training.models.sampling import num_negatives  # noqa: E402
from training.fit.train_loop import build_model  # noqa: E402
from training.models.two_tower import SeedTwoTower, SeedTwoTowerConfig  # noqa: E402


def _seed(encoder: str = "transformer", **kw) -> SeedTwoTower:
    torch.manual_seed(0)
    return SeedTwoTower(SeedTwoTowerConfig(**SIZES, dim=16, user_encoder=encoder, **kw))


def test_seed_two_tower_serves_unit_vectors_through_the_two_tower_api():
    for encoder in ("transformer", "attention"):
        model = _seed(encoder).eval()
        u = model.user_tower(*toy_batch())
        v = model.item_tower_by_index(torch.arange(1, 9))
        w = model.item_tower(torch.arange(1, 9), model.items.item_brand[1:9], model.items.item_category[1:9],
                             model.items.item_price[1:9])
        assert u.shape == (8, 16) and v.shape == (8, 16)
        torch.testing.assert_close(u.norm(dim=-1), torch.ones(8))
        torch.testing.assert_close(v, w)


def test_seed_two_tower_rejects_an_unknown_user_encoder():
    with pytest.raises(ValueError, match="user_encoder"):
        SeedTwoTowerConfig(**SIZES, user_encoder="lstm")


def test_seed_user_tower_ignores_left_padding_and_reads_the_order():
    for encoder in ("transformer", "attention"):
        model = _seed(encoder).eval()
        items, actions, ages, ctx = toy_batch(B=1)
        pad = torch.zeros(1, 3, dtype=torch.long)
        u = model.user_tower(items, actions, ages, ctx)
        torch.testing.assert_close(u, model.user_tower(*(torch.cat([pad, x], dim=1) for x in (items, actions, ages)),
                                                       ctx))
    # The transformer sees which action is the latest; mean pooling (the foundation tower) cannot.
    model, mean = _seed("transformer").eval(), TwoTower(TwoTowerConfig(**SIZES, dim=16)).eval()
    items, actions, ages, ctx = toy_batch(B=1)
    flip = [x.flip(1) for x in (items, actions, ages)]
    assert not torch.allclose(model.user_tower(items, actions, ages, ctx), model.user_tower(*flip, ctx), atol=1e-4)
    torch.testing.assert_close(mean.user_tower(items, actions, ages, ctx), mean.user_tower(*flip, ctx))


def test_seed_empty_history_gives_finite_vectors_and_gradients():
    for encoder in ("transformer", "attention"):
        model = _seed(encoder)
        items, actions, ages, ctx = toy_batch(B=4)
        for x in (items, actions, ages):
            x[0] = 0  # user 0 has no history
        loss = model(items, actions, ages, ctx, torch.tensor([1, 2, 3, 4]))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_seed_prepare_ranks_the_sampler_by_training_counts_and_sizes_negatives_by_catalog():
    model = _seed(neg_fraction=0.5)
    counts = np.zeros(101, dtype=np.int64)
    counts[42], counts[7] = 100, 50
    data = {"item_brand": np.zeros(101, dtype=np.int64), "item_category": np.zeros(101, dtype=np.int64),
            "item_price": np.zeros(101, dtype=np.int64), "item_counts": counts}
    model.prepare(data)
    assert model.sampler.rank_to_item[:2].tolist() == [42, 7]
    assert model.item_log_q[42] > model.item_log_q[7] > model.item_log_q[8]
    assert model.n_negatives == num_negatives(101, 0.5) == 64


def test_seed_two_tower_learns_a_user_to_item_association():
    for in_batch in (True, False):
        model = _seed(in_batch=in_batch, temperature=0.1)
        hist = torch.arange(1, 41).unsqueeze(1)  # "engaged with item j" -> target j + 50
        acts = torch.ones_like(hist)
        ctx = torch.zeros(40, 8, dtype=torch.long)
        target = hist.squeeze(1) + 50
        fit_full_batch(model, (hist, acts, acts, ctx, target), 150, 1e-2)
        with torch.no_grad():
            scores = model.user_tower(hist, acts, acts, ctx) @ model.item_tower_by_index(torch.arange(101)).T
        top1 = scores[:, 1:].argmax(1) + 1
        assert (top1 == target).float().mean() > 0.8, in_batch


def test_seed_two_tower_round_trips_through_its_config_and_state_dict():
    model = _seed().eval()
    model.sampler.set_counts(torch.arange(101, dtype=torch.float64))
    again = build_model("training.models.two_tower:SeedTwoTower", model.config.to_dict())
    again.load_state_dict(model.state_dict())
    batch = toy_batch()
    torch.testing.assert_close(again.eval().user_tower(*batch), model.user_tower(*batch))
    assert torch.equal(again.sampler.rank_to_item, model.sampler.rank_to_item)
