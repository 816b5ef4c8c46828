"""Ranking baselines: one logit per task on the ranker's inputs, and each learns a planted signal."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, fit_full_batch, toy_batch
from training.metrics import roc_auc
from training.models.rank_baselines import BASELINES, BaselineConfig
from training.models.ranker import TASKS, MultiTaskRanker
from training.fit.train_loop import build_model


def _model(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(BASELINES[name], BaselineConfig(**SIZES, **kw).to_dict())


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_gives_one_logit_per_task_and_a_scalar_training_loss(name):
    model = _model(name)
    inputs = toy_batch(B=6)
    item = torch.arange(1, 7)
    assert model.logits(*inputs, item).shape == (6, len(TASKS))
    assert model.combined(model.logits(*inputs, item)).shape == (6,)
    loss = model(*inputs, item, torch.full((6,), 3), torch.zeros(6, len(TASKS)))
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.TRAIN_INPUTS == MultiTaskRanker.TRAIN_INPUTS


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_prepare_fills_the_item_lookups_of_every_embedding(name):
    model = _model(name)
    brand = torch.arange(SIZES["n_items"]) % SIZES["n_brands"]
    model.prepare({"item_brand": brand.numpy(), "item_category": np.zeros(SIZES["n_items"], np.int64),
                   "item_price": np.zeros(SIZES["n_items"], np.int64)})
    tables = [m for m in model.modules() if type(m).__name__ == "ItemEmbedding"]
    assert tables and all(torch.equal(t.item_brand, brand) for t in tables)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_learns_a_planted_item_and_context_signal(name):
    model = _model(name, dim=8, hidden=32)
    g = torch.Generator().manual_seed(1)
    n = 512
    hist, acts, ages, ctx = toy_batch(B=n, L=3, seed=2)
    item = torch.randint(1, 101, (n,), generator=g)
    # Purchases happen on even items shown on device 1: a first-order item effect and an item x context cross.
    signal = (item % 2 == 0) & (ctx[:, 1] == 1)
    labels = torch.zeros(n, len(TASKS))
    labels[:, 0] = (item % 2 == 0).float()
    labels[:, 3] = signal.float()
    pos = torch.full((n,), -1)
    fit_full_batch(model, (hist, acts, ages, ctx, item, pos, labels), 60, 2e-2)
    model.eval()
    with torch.inference_mode():
        p = torch.sigmoid(model.logits(hist, acts, ages, ctx, item)).numpy()
    assert roc_auc(labels[:, 0].numpy(), p[:, 0]) > 0.95
    assert roc_auc(labels[:, 3].numpy(), p[:, 3]) > 0.85


def test_product_logit_is_the_logit_of_the_product_of_probabilities_even_far_in_the_tails():
    from training.models.rank_baselines import product_logit

    a = torch.tensor([-30.0, -3.0, 0.0, 2.0, 30.0], dtype=torch.float64)
    b = torch.tensor([5.0, -1.0, 0.0, 40.0, 30.0], dtype=torch.float64)
    p = torch.sigmoid(product_logit(a, b))
    assert torch.allclose(p, torch.sigmoid(a) * torch.sigmoid(b), rtol=1e-6, atol=1e-12)
    assert torch.isfinite(product_logit(a.float() * 10, b.float() * 10)).all()


def test_esmm_never_predicts_a_task_more_likely_than_the_click_it_needs():
    model = _model("esmm")
    p = torch.sigmoid(model.logits(*toy_batch(B=32, seed=3), torch.arange(1, 33)))
    assert (p[:, 1:] <= p[:, :1] + 1e-6).all()


def test_ple_with_one_level_is_a_cgc_and_bad_settings_are_refused():
    one = _model("ple", ple_levels=1)
    assert one.logits(*toy_batch(B=4), torch.arange(1, 5)).shape == (4, len(TASKS))
    with pytest.raises(ValueError, match="ple_levels"):
        _model("ple", ple_levels=0)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_with_the_retrieval_feature_every_parameter_gets_a_gradient(name):
    """Distributed training (DDP) fails on a parameter the loss does not reach."""
    model = _model(name, retrieval_feature=True)
    labels = torch.zeros(6, len(TASKS))
    model(*toy_batch(B=6), torch.arange(1, 7), torch.full((6,), 3), labels, torch.randn(6)).backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


@pytest.mark.parametrize("name", ["deepfm", "esmm"])
def test_a_baseline_with_the_retrieval_feature_needs_the_score_and_learns_from_it(name):
    from training.models.embeddings import ITEM_LOOKUPS

    model = _model(name, retrieval_feature=True)
    assert model.train_inputs(model.config)[-1] == "retrieval_score"
    assert _model(name).train_inputs(_model(name).config) == MultiTaskRanker.TRAIN_INPUTS
    inputs, item = toy_batch(B=256, seed=5), torch.randint(1, SIZES["n_items"], (256,))
    with pytest.raises(ValueError, match="retrieval_score"):
        model.scored_logits(*inputs, item)
    score = torch.randn(256) * 3.0 - 7.0
    model.prepare({k: np.zeros(SIZES["n_items"], np.int64) for k in ITEM_LOOKUPS} | {"retrieval_score": score.numpy()})
    assert abs(model.retrieval_mean.item() - score.mean().item()) < 1e-4
    labels = (score > -7.0).float()[:, None].expand(-1, len(TASKS)).contiguous()  # only the score says anything
    fit_full_batch(model, (*inputs, item, torch.full((256,), -1), labels, score), steps=150, lr=1e-2)
    model.eval()
    p = torch.sigmoid(model.scored_logits(*inputs, item, score))[:, 0].detach().numpy()
    assert roc_auc(labels[:, 0].numpy(), p) > 0.95
