"""LightGCN: the propagation is LightGCN's normalised graph mean, users aggregate their history, a bundle serves
without the graph, and the graph is validated."""
from __future__ import annotations

import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, fit_full_batch, toy_batch
from training.models.lightgcn import LightGCN, LightGCNConfig

USERS = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
ITEMS = torch.tensor([1, 2, 2, 3, 4, 4, 5, 1])


def _model(n_layers: int = 2) -> LightGCN:
    torch.manual_seed(0)
    model = LightGCN(LightGCNConfig(**SIZES, dim=8, n_layers=n_layers))
    model.set_graph(USERS, ITEMS)
    return model


def test_propagation_is_the_mean_of_normalised_item_user_item_hops():
    model = _model(n_layers=2)
    n_users, n_items = 4, SIZES["n_items"]
    A = torch.zeros(n_users, n_items)
    A[USERS, ITEMS] = 1.0
    du, di = A.sum(1), A.sum(0)
    A_hat = A / torch.sqrt(du.clamp(min=1)).unsqueeze(1) / torch.sqrt(di.clamp(min=1)).unsqueeze(0)
    I0 = model.items.summed(torch.arange(n_items))
    I1 = A_hat.T @ (A_hat @ I0)
    I2 = A_hat.T @ (A_hat @ I1)
    torch.testing.assert_close(model.propagate(), (I0 + I1 + I2) / 3)


def test_the_user_is_the_degree_normalised_sum_of_their_history():
    model = _model().eval()
    hist = torch.tensor([[0, 0, 2, 4]])  # right-aligned, two items
    V = model.item_final
    deg = model.item_degree
    want = V[2] / torch.sqrt(2 * deg[2]) + V[4] / torch.sqrt(2 * deg[4])
    items, actions, ages, ctx = toy_batch(1, 4)
    torch.testing.assert_close(model.user_tower(hist, actions, ages, ctx)[0], want)
    assert torch.equal(model.user_tower(torch.zeros(1, 4, dtype=torch.long), actions, ages, ctx), torch.zeros(1, 8))


def test_a_saved_model_serves_without_the_graph_and_new_items_embed_from_attributes():
    model = _model()
    items, actions, ages, ctx = toy_batch(16, 5)
    fit_full_batch(model, (items, actions, ages, ctx, items[:, -1]), steps=5, lr=0.05)
    model.eval()  # refreshes item_final from the trained weights
    torch.testing.assert_close(model.item_final, model.propagate())
    served = LightGCN.from_config(model.config.to_dict())
    served.load_state_dict(model.state_dict())
    served.eval()  # no graph here: nothing to refresh, the saved vectors stay
    torch.testing.assert_close(served.item_tower_by_index(torch.arange(10)), model.item_tower_by_index(torch.arange(10)))
    torch.testing.assert_close(served.user_tower(items, actions, ages, ctx), model.user_tower(items, actions, ages, ctx))
    new = served.item_tower(torch.tensor([0, 3]), torch.tensor([2, 0]), torch.tensor([1, 0]), torch.tensor([3, 0]))
    assert torch.isfinite(new).all() and new[0].abs().sum() > 0
    torch.testing.assert_close(new[1], served.item_final[3])
    with pytest.raises(RuntimeError, match="prepare"):
        served.propagate()


def test_training_learns_a_next_item_rule():
    model = _model()
    model.train()
    hist = torch.tensor([[0, 0, 1], [0, 0, 3], [0, 0, 5]])
    target = torch.tensor([2, 4, 1])
    _, actions, ages, ctx = toy_batch(3, 3)
    first = model(hist, actions, ages, ctx, target).item()
    last = fit_full_batch(model, (hist, actions, ages, ctx, target), steps=60, lr=0.05)
    assert last < first / 2
    model.eval()
    scores = model.user_tower(hist, actions, ages, ctx) @ model.item_final.T
    scores[:, 0] = -torch.inf
    assert scores.argmax(1).tolist() == target.tolist()


def test_bad_graphs_are_errors_naming_the_problem():
    model = LightGCN(LightGCNConfig(**SIZES, dim=8))
    with pytest.raises(ValueError, match="duplicate"):
        model.set_graph(torch.tensor([0, 0]), torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="1..100"):
        model.set_graph(torch.tensor([0]), torch.tensor([101]))
    with pytest.raises(ValueError, match="equal-length"):
        model.set_graph(torch.tensor([0, 1]), torch.tensor([1]))
