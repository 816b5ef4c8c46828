"""The transformer ranker: task heads and weights, history encoded once, the training-only position tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, fit_full_batch, toy_batch
from training.data.features import ITEM_LOOKUPS
from training.models.ranker import TASKS, MultiTaskRanker, RankerConfig, position_bucket, score_candidates


def _ranker(**kw) -> MultiTaskRanker:
    torch.manual_seed(0)
    return MultiTaskRanker(RankerConfig(**SIZES, **kw)).eval()


def test_ranker_scores_every_task_and_combines_them_with_the_task_weights():
    model = _ranker(task_weights=(0.0, 0.0, 0.0, 1.0))
    logits = model.logits(*toy_batch(B=4), torch.arange(1, 5))
    assert logits.shape == (4, len(TASKS))
    torch.testing.assert_close(model.combined(logits), torch.sigmoid(logits[:, 3]))


def test_loss_weights_select_which_tasks_are_trained():
    model = _ranker(loss_weights=(0.0, 0.0, 0.0, 1.0))
    logits = torch.randn(6, len(TASKS))
    labels = torch.randint(0, 2, (6, len(TASKS))).float()
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 3], labels[:, 3])
    torch.testing.assert_close(model.loss(logits, labels), expected)
    other = labels.clone()
    other[:, :3] = 1.0 - other[:, :3]  # flipping the zero-weighted tasks' labels changes nothing
    torch.testing.assert_close(model.loss(logits, other), expected)


def test_bad_task_weights_name_the_field():
    with pytest.raises(ValueError, match="task_weights"):
        RankerConfig(**SIZES, task_weights=(1.0, 2.0))


def test_history_encoded_once_per_request_gives_the_same_scores_as_per_candidate_scoring():
    model = _ranker()
    inputs = toy_batch(B=2)
    cands = [np.array([3, 7, 9, 11]), np.array([5, 6])]
    batched = score_candidates(model, *(x.numpy() for x in inputs), cands)
    with torch.inference_mode():
        for r, c in enumerate(cands):
            for j, item in enumerate(c):
                single = model.combined(model.logits(*(x[r:r + 1] for x in inputs), torch.tensor([item])))
                assert abs(single.item() - batched[r][j]) < 1e-5


def test_candidate_attention_depends_on_the_history():
    model = _ranker()
    items, actions, ages, ctx = toy_batch(B=1)
    a = score_candidates(model, items.numpy(), actions.numpy(), ages.numpy(), ctx.numpy(), [np.arange(1, 30)])[0]
    b = score_candidates(model, (items % 50 + 1).numpy(), actions.numpy(), ages.numpy(), ctx.numpy(),
                         [np.arange(1, 30)])[0]
    assert not np.allclose(a, b)


def test_padded_history_and_empty_history_score_finitely_and_padding_changes_nothing():
    model = _ranker()
    items, actions, ages, ctx = toy_batch(B=1)
    pad = torch.zeros(1, 3, dtype=torch.long)
    longer = [torch.cat([pad, x], dim=1) for x in (items, actions, ages)]
    with torch.inference_mode():
        torch.testing.assert_close(model.logits(items, actions, ages, ctx, torch.tensor([4])),
                                   model.logits(*longer, ctx, torch.tensor([4])))
        empty = model.logits(*(torch.zeros_like(x) for x in (items, actions, ages)), ctx, torch.tensor([4]))
    assert torch.isfinite(empty).all()


def test_position_changes_the_training_loss_but_not_the_serving_scores():
    model = _ranker(position_dropout=0.0, dropout=0.0)
    inputs = toy_batch(B=8)
    item = torch.arange(1, 9)
    labels = torch.zeros(8, len(TASKS))
    with torch.no_grad():
        model.position[2].weight.normal_()  # a trained tower: positions move the click logit
    model.train()
    top, low = (model(*inputs, item, torch.full((8,), p), labels) for p in (0, 15))
    assert not torch.isclose(top, low)
    unknown = model(*inputs, item, torch.full((8,), -1), labels)
    torch.testing.assert_close(unknown, model.loss(model.logits(*inputs, item), labels))  # -1 adds exactly zero
    model.eval()
    served = score_candidates(model, *(x.numpy() for x in inputs), [item.numpy()] * 8)
    plain = MultiTaskRanker(model.config).eval()
    plain.load_state_dict(model.state_dict())
    assert np.allclose(served[0], score_candidates(plain, *(x.numpy() for x in inputs), [item.numpy()] * 8)[0])


def test_position_buckets_reserve_zero_for_unknown_and_clip_deep_positions():
    b = position_bucket(torch.tensor([-1, 0, 3, 500]), n_positions=10)
    assert b.tolist() == [0, 1, 4, 9]


def test_ranker_without_position_tower_has_no_position_parameters():
    model = _ranker(position_debias=False)
    assert not any(name.startswith("position") for name, _ in model.named_parameters())
    assert torch.equal(model.position_logits(torch.tensor([0, 5])), torch.zeros(2, len(TASKS)))


def test_ranker_learns_a_planted_history_to_item_signal():
    torch.manual_seed(0)
    model = MultiTaskRanker(RankerConfig(**SIZES, dim=8, heads=1, ffn=16, hidden=32))
    n = 256
    g = torch.Generator().manual_seed(1)
    hist = torch.randint(1, 51, (n, 4), generator=g)
    item = torch.randint(1, 101, (n,), generator=g)
    # Every task is positive exactly when the candidate is "item + 50" of the last history item.
    item = torch.where(torch.rand(n, generator=g) < 0.5, hist[:, -1] + 50, item)
    labels = (item == hist[:, -1] + 50).float().unsqueeze(1).repeat(1, len(TASKS))
    acts, ctx, pos = torch.ones_like(hist), torch.zeros(n, 8, dtype=torch.long), torch.full((n,), -1)
    fit_full_batch(model, (hist, acts, acts, ctx, item, pos, labels), 60, 3e-2)
    model.eval()
    with torch.inference_mode():
        p = torch.sigmoid(model.logits(hist, acts, acts, ctx, item))[:, 3]
    assert ((p > 0.5).float() == labels[:, 3]).float().mean() > 0.9


def test_the_retrieval_feature_is_required_standardised_and_learnable():
    torch.manual_seed(0)
    model = MultiTaskRanker(RankerConfig(**SIZES, retrieval_feature=True, position_debias=False))
    assert model.train_inputs(model.config)[-1] == "retrieval_score"
    inputs = toy_batch(B=256, seed=4)
    item = torch.randint(1, SIZES["n_items"], (256,))
    with pytest.raises(ValueError, match="retrieval_score"):
        model.logits(*inputs, item)
    lookups = {k: np.zeros(SIZES["n_items"], np.int64) for k in ITEM_LOOKUPS}
    with pytest.raises(ValueError, match="retrieval_score"):
        model.prepare(lookups)
    score = torch.randn(256) * 5.0 + 20.0  # far from standard: the buffers rescale it
    model.prepare(lookups | {"retrieval_score": score.numpy()})
    assert abs(model.retrieval_mean.item() - score.mean().item()) < 1e-4
    assert abs(model.retrieval_std.item() - score.std(unbiased=False).item()) < 1e-4
    labels = (score > 20.0).float()[:, None].expand(-1, len(TASKS)).contiguous()  # only the score says anything
    fit_full_batch(model, (*inputs, item, torch.full((256,), -1), labels, score), steps=150, lr=1e-2)
    model.eval()
    p = torch.sigmoid(model.logits(*inputs, item, score))[:, 0]
    assert p[labels[:, 0] == 1].min() > p[labels[:, 0] == 0].max() - 0.2 and p[labels[:, 0] == 1].mean() > 0.8
    # score_candidates with per-candidate retrieval scores gives the per-row logits
    rows = [np.asarray([int(item[r])]) for r in range(4)]
    got = score_candidates(model, *(x[:4].numpy() for x in inputs), rows, [np.asarray([float(score[r])]) for r in range(4)])
    want = model.combined(model.logits(*(x[:4] for x in inputs), item[:4], score[:4])).detach().numpy()
    np.testing.assert_allclose(np.concatenate(got), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="as long"):
        score_candidates(model, *(x[:4].numpy() for x in inputs), rows, [np.zeros(2)] * 4)


@pytest.mark.parametrize("curve", ["power:0.8", "exponential:0.7"])
def test_the_position_tower_learns_the_examination_curve_the_clicks_followed(curve):
    """Shown at random positions, items of known relevance are clicked with r x examination(position): the tower's
    learned click effect follows that curve, whichever of two shapes generated the clicks (small r: logit ~ log)."""
    from training.data.synthetic import Examination
    from training.evaluation.ranking import learned_position_effect

    examination = Examination.parse(curve)
    model = _ranker(position_dropout=0.0, dropout=0.0, dim=8, ffn=16, hidden=32)  # small: the tower is the point
    g = torch.Generator().manual_seed(4)
    n, shown = 12000, 6
    hist, acts, ages, ctx = toy_batch(B=n, L=1, seed=5)
    item = torch.randint(1, 101, (n,), generator=g)
    pos = torch.randint(0, shown, (n,), generator=g)
    r = 0.02 + 0.18 * (item % 5).float() / 4  # relevance from the item alone, at most 0.2
    p_click = r * torch.from_numpy(examination.probability(pos.numpy())).float()
    labels = torch.zeros(n, len(TASKS))
    labels[:, 0] = (torch.rand(n, generator=g) < p_click).float()
    model.train()
    fit_full_batch(model, (hist, acts, ages, ctx, item, pos, labels), 120, 5e-2)
    learned = np.asarray(learned_position_effect(model.eval(), shown))
    truth = np.asarray(examination.log_effect(shown))
    assert np.mean(np.abs(learned - truth)) < 0.2, (learned.round(2), truth.round(2))  # ~2000 rows a position
    assert np.corrcoef(learned, truth)[0, 1] > 0.95
