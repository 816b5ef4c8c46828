"""The ranker's two-stage training data: retrieval's score of every example and retrieval's own candidates as its
negatives, each checked against brute force over the tower."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, toy_batch
from training.data.examples import TASKS, Impressions
from training.fit.ranker_data import item_matrix, retrieval_scores, retrieved_negatives, top_retrieved
from training.models.two_tower import SeedTwoTower, SeedTwoTowerConfig


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    sizes = {k: v for k, v in SIZES.items() if k in SeedTwoTowerConfig.__dataclass_fields__}
    return SeedTwoTower(SeedTwoTowerConfig(**sizes, dim=16)).eval()


def _impressions(n: int = 40) -> Impressions:
    items, actions, ages, ctx = (t.numpy() for t in toy_batch(B=n, L=5, seed=3))
    rng = np.random.default_rng(0)
    labels = (rng.random((n, len(TASKS))) < 0.3).astype(np.float32)
    return Impressions(items, actions, ages, ctx, rng.integers(1, SIZES["n_items"], n), rng.integers(0, 10, n), labels,
                       np.sort(rng.integers(0, 10_000, n)))


def _brute(tower, imp: Impressions) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        U = tower.user_tower(*(torch.from_numpy(a) for a in (imp.hist_items, imp.hist_actions, imp.hist_ages,
                                                              imp.context))).numpy()
        V = tower.item_tower_by_index(torch.arange(SIZES["n_items"])).numpy()  # the table: padding + items
    return U, V


def test_retrieval_scores_are_the_user_tower_dot_the_item_tower_per_row(tower):
    imp = _impressions()
    U, V = _brute(tower, imp)
    inputs = (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context)
    got = retrieval_scores(tower, inputs, imp.item)
    np.testing.assert_allclose(got, (U * V[imp.item]).sum(1), rtol=1e-5, atol=1e-6)
    lists = np.stack([imp.item, np.roll(imp.item, 1)], axis=1)  # (n, 2): a list of candidates per row
    np.testing.assert_allclose(retrieval_scores(tower, inputs, lists), np.einsum("nd,nmd->nm", U, V[lists]),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="rows"):
        retrieval_scores(tower, inputs, imp.item[:3])


def test_top_retrieved_is_the_exact_top_k_without_the_padding_row(tower):
    imp = _impressions(10)
    U, V = _brute(tower, imp)
    inputs = (imp.hist_items, imp.hist_actions, imp.hist_ages, imp.context)
    top = top_retrieved(tower, inputs, 7, item_matrix(tower, SIZES["n_items"] - 1))
    scores = U @ V.T
    scores[:, 0] = -np.inf
    want = np.argsort(-scores, axis=1)[:, :7]
    assert (np.sort(top, 1) == np.sort(want, 1)).all() and (top > 0).all()


def test_retrieved_negatives_come_from_the_rows_own_retrieval_top_and_keep_time_order(tower):
    imp = _impressions(60)
    out = retrieved_negatives(imp, tower, SIZES["n_items"] - 1, ratio=2.0, depth=5, seed=1)
    assert len(out) == 3 * len(imp)
    assert (np.diff(out.time_ms) >= 0).all()
    neg = out.position == -1
    assert neg.sum() == 2 * len(imp) and (out.labels[neg] == 0).all()
    U, V = _brute(tower, out.subset(neg))
    scores = U @ V.T
    scores[:, 0] = -np.inf
    top6 = np.argsort(-scores, axis=1)[:, :6]  # the top 5, and the spare that replaces the row's own item
    items = out.item[neg]
    assert all(i in row for i, row in zip(items, top6))
    # every negative's user state is one of the impressions' (its history and context copied with it)
    states = {tuple(np.concatenate([a, b])) for a, b in zip(imp.hist_items, imp.context)}
    assert all(tuple(np.concatenate([a, b])) in states
               for a, b in zip(out.hist_items[neg], out.context[neg]))
    with pytest.raises(ValueError, match="ratio"):
        retrieved_negatives(imp, tower, SIZES["n_items"] - 1, ratio=-1.0, depth=5, seed=1)


def test_train_config_names_a_bad_ranker_negatives_setting():
    from training.fit.train_loop import TrainConfig

    with pytest.raises(ValueError, match="ranker_negatives"):
        TrainConfig(ranker_negatives="hard")
    with pytest.raises(ValueError, match="ranker_candidate_depth"):
        TrainConfig(ranker_candidate_depth=0)
    with pytest.raises(ValueError, match="ranker_views"):
        TrainConfig(ranker_views="clicked")
    with pytest.raises(ValueError, match="ranker_item_init"):
        TrainConfig(ranker_item_init="pretrained")


def test_a_ranker_on_served_views_needs_a_served_period_with_views():
    from training.data.features import engagements_of
    from training.data.splits import temporal
    from training.data.synthetic import generate_shop
    from training.fit.train_loop import TrainConfig
    from training.fit.version import train_ranker

    task = temporal(generate_shop("tiny", seed=0))
    history = engagements_of(task.train_events, task.space)
    cfg = TrainConfig(ranker_views="served", ranker_negatives="uniform", ranker_retrieval_feature=False)
    with pytest.raises(ValueError, match="served_from"):
        train_ranker(task, history, cfg, "no-period")
    with pytest.raises(ValueError, match="no logged view"):  # a served period after every training event
        train_ranker(task, history, cfg, "empty-period", served_from_ms=task.new_after_ms + 1)


def test_the_item_tower_init_keeps_each_items_neighbours_and_the_tables_spread():
    from training.models.embeddings import ITEM_INIT, INIT_STD, ItemEmbedding

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 64, generator=g)
    n = 201
    group = torch.arange(n) % 5
    vectors = centres[group] + 0.1 * torch.randn(n, 64, generator=g)  # five clusters of items, row 0 = padding
    emb = ItemEmbedding(n, 3, 3, 3, dim=16)
    emb.fill_item_features({"item_brand": np.zeros(n, np.int64), "item_category": np.zeros(n, np.int64),
                            "item_price": np.zeros(n, np.int64), ITEM_INIT: vectors.numpy()})
    w = emb.item.weight.detach()
    assert torch.equal(w[0], torch.zeros(16)) and w[1:].std().item() == pytest.approx(INIT_STD, rel=1e-4)
    unit = torch.nn.functional.normalize(w[1:], dim=1)
    cos = unit @ unit.T
    same = group[1:, None] == group[None, 1:]
    assert cos[same].mean() > 0.9 and cos[~same].mean() < 0.2  # the tower's neighbourhoods survive the projection
    narrow = ItemEmbedding(n, 3, 3, 3, dim=16)
    narrow.init_item_vectors(vectors[:, :8])  # fewer dims than the table: zero-padded
    assert torch.equal(narrow.item.weight[:, 8:].detach(), torch.zeros(n, 8))
    with pytest.raises(ValueError, match=r"\(201, D\)"):
        emb.init_item_vectors(vectors[:10])


def test_a_ranker_started_from_the_item_tower_needs_the_retriever():
    from training.data.features import engagements_of
    from training.data.splits import temporal
    from training.data.synthetic import generate_shop
    from training.fit.train_loop import TrainConfig
    from training.fit.version import train_ranker

    task = temporal(generate_shop("tiny", seed=0))
    cfg = TrainConfig(ranker_negatives="uniform", ranker_retrieval_feature=False, ranker_item_init="tower")
    with pytest.raises(ValueError, match="item-tower init"):
        train_ranker(task, engagements_of(task.train_events, task.space), cfg, "no-tower")
