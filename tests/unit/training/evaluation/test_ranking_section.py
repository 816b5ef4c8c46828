"""Ranking evaluation: graded NDCG against hidden relevance, re-ranking, candidate scoring, engagement negatives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.unit.training.models.model_helpers import SIZES, toy_batch
from training.data.features import build_feature_space, item_feature_table
from training.metrics import popularity_counts
from training.models.rank_baselines import BaselineConfig, DeepFM
from training.models.ranker import TASKS, MultiTaskRanker, RankerConfig
from training.evaluation.ranking import (candidate_logits, engagement_impressions, graded_ndcg, ranking_markdown, rerank,
                                   true_relevance_of)


def test_graded_ndcg_is_one_for_the_true_order_and_matches_a_hand_computed_value():
    rel = np.array([[0.9, 0.1, 0.5]])
    valid = np.ones_like(rel, dtype=bool)
    assert graded_ndcg(rel, rel, valid, k=2) == pytest.approx(1.0)
    # Order 1, 2, 0: DCG = 0.1 + 0.5 / log2(3); ideal = 0.9 + 0.5 / log2(3).
    expected = (0.1 + 0.5 / np.log2(3)) / (0.9 + 0.5 / np.log2(3))
    assert graded_ndcg(np.array([[1.0, 3.0, 2.0]]), rel, valid, k=2) == pytest.approx(expected)


def test_graded_ndcg_never_places_padding_and_skips_users_without_relevance():
    rel = np.array([[0.2, 0.9, 0.0], [0.0, 0.0, 0.0]])
    valid = np.array([[True, False, True], [True, True, True]])
    # The high-relevance column is padding: it neither counts in the ideal nor can the model score it.
    assert graded_ndcg(np.array([[0.0, 9.0, 1.0], [1.0, 2.0, 3.0]]), rel, valid, k=1) == pytest.approx(0.0)
    assert graded_ndcg(np.array([[1.0, 9.0, 0.0], [1.0, 2.0, 3.0]]), rel, valid, k=1) == pytest.approx(1.0)


def test_rerank_orders_candidates_by_score_and_drops_empty_slots():
    cands = np.array([[5, 0, 7, 9], [3, -1, -1, -1]])
    scores = np.array([[0.1, 9.0, 0.7, 0.3], [0.5, 1.0, 2.0, 3.0]])
    assert rerank(scores, cands, k=3).tolist() == [[7, 9, 5], [3, -1, -1]]


def test_true_relevance_of_reads_the_generator_truth_by_row():
    from training.data.synthetic import generate_shop, true_relevance

    shop = generate_shop("tiny", 0)
    cands = np.array([[1, 10, 0], [2, 3, 4]])
    rel = true_relevance_of(shop.hidden, np.array([5, 7]), cands)
    assert rel[0, 2] == 0.0
    assert rel[1, 0] == pytest.approx(true_relevance(shop.hidden, np.array(7), np.array(1)))


@pytest.mark.parametrize("feature", [False, True])
@pytest.mark.parametrize("make", [lambda f: MultiTaskRanker(RankerConfig(**SIZES, retrieval_feature=f)),
                                  lambda f: DeepFM(BaselineConfig(**SIZES, retrieval_feature=f))])
def test_candidate_logits_equal_one_row_per_candidate(make, feature):
    torch.manual_seed(0)
    model = make(feature).eval()
    users = tuple(x.numpy() for x in toy_batch(B=3))
    cands = np.array([[4, 8, 15], [16, 23, 42], [1, 2, 3]])
    scores = np.random.default_rng(0).standard_normal(cands.shape).astype(np.float32) if feature else None
    got = candidate_logits(model, users, cands, chunk=2, scores=scores)
    with torch.inference_mode():
        for u in range(3):
            rows = [torch.from_numpy(a[u:u + 1]).repeat(3, 1) for a in users]
            rs = (torch.from_numpy(scores[u]),) if feature else ()
            want = model.scored_logits(*rows, torch.from_numpy(cands[u]), *rs).numpy()
            np.testing.assert_allclose(got[u], want, atol=1e-5)


def test_the_section_trains_on_retrieved_negatives_and_scores_when_it_has_the_two_tower_model():
    """As a version does: negatives from the two-tower's own top items for each impression's user state, and the
    retrieval score of every training, held-out and candidate row; another source gets uniform negatives only."""
    from training.data.splits import temporal
    from training.data.synthetic import generate_shop
    from training.evaluation.ranking import section_training_data, split_impressions
    from training.fit.ranker_data import item_matrix, retrieval_scores, top_retrieved
    from training.evaluation.harness import load_model
    from training.fit.train_loop import TrainConfig, build_model

    task = temporal(generate_shop("tiny", 0), max_users=40)
    cfg = TrainConfig(ranker_candidate_depth=20)
    spec = load_model("two_tower").fit_spec(task, cfg)
    torch.manual_seed(0)
    tower = build_model(spec.model, spec.model_config).eval()  # untrained: its scores are its own all the same
    logged, held, _ = split_impressions(task, cfg)
    rows = np.arange(40)
    users = task.user_inputs(rows)
    cands = np.arange(1, 41)[None].repeat(40, 0)
    train, negatives, scores = section_training_data(task, logged, held, users, cands, cfg, 1.0, tower)
    assert negatives == "retrieved" and len(train) == 2 * len(logged)
    added = train.position == -1  # the added negatives (every logged view of the shop has its position)
    assert added.sum() == len(logged) and (train.labels[added] == 0).all()
    state = (train.hist_items[added], train.hist_actions[added], train.hist_ages[added], train.context[added])
    top = top_retrieved(tower, state, 21, item_matrix(tower, task.space.n_items))
    assert np.mean([i in t for i, t in zip(train.item[added], top)]) > 0.95  # retrieval's top, not the catalog
    s_train, s_held, s_cands = scores
    assert s_train.shape == (len(train),) and s_held.shape == (len(held),) and s_cands.shape == cands.shape
    np.testing.assert_allclose(s_cands, retrieval_scores(tower, users, cands), rtol=1e-5, atol=1e-5)
    train_u, negatives_u, scores_u = section_training_data(task, logged, held, users, cands, cfg, 1.0, None)
    assert negatives_u == "uniform" and scores_u is None and len(train_u) == 2 * len(logged)


def test_engagement_impressions_label_engagements_and_sample_negatives():
    from training.data.synthetic import generate_shop

    shop = generate_shop("tiny", 0)
    events = shop.events.filter(np.array([a != "view" for a in shop.events.column("action").to_pylist()]))
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    feats = item_feature_table(shop.catalog, space)
    pop = popularity_counts(space.lookup("item_ids", events.column("item_id").to_pylist()), space.n_items)
    imp = engagement_impressions(events, space, feats, pop, seed=0)
    n_pos = int(imp.labels[:, 0].sum())
    assert n_pos == len(events) and len(imp) == 5 * n_pos  # 4 negatives per engagement
    assert (imp.labels[:, 3].sum() == sum(a == "purchase" for a in events.column("action").to_pylist()))
    assert (imp.position == -1).all() and np.all(np.diff(imp.time_ms) >= 0)


def test_markdown_table_has_a_row_per_model_and_the_truth_column_only_with_truth():
    metrics = {t: {"auc": 0.7, "log_loss": 0.3, "positives": 5} for t in TASKS}
    results = {"impressions": "views", "train_impressions": 90, "heldout_impressions": 10, "users": 4,
               "candidates_per_user": 500, "retrieval_order_ndcg@10": 0.1,
               "models": {"a": {"tasks": metrics, "ndcg@10": 0.2, "training": {"seconds": 3.0}},
                          "b": {"tasks": metrics, "ndcg@10": float("nan"), "training": {"seconds": 4.0}}}}
    md = ranking_markdown(results)
    assert md.count("\n| a |") + md.count("\n| b |") == 2 and "true r" not in md and "n/a" in md


def test_sampled_negatives_keep_every_impression_add_unlabelled_unshown_rows_in_time_order():
    from training.data.examples import Impressions
    from training.evaluation.ranking import add_sampled_negatives

    n = 10
    imp = Impressions(np.arange(n * 3).reshape(n, 3), np.ones((n, 3), np.int64), np.ones((n, 3), np.int64),
                      np.zeros((n, 8), np.int64), np.arange(1, n + 1), np.arange(n), np.ones((n, 4), np.float32),
                      np.arange(n) * 10)
    out = add_sampled_negatives(imp, n_items=50, ratio=0.5, seed=0)
    assert len(out) == 15 and out.labels.sum() == imp.labels.sum()
    neg = out.labels.sum(1) == 0
    assert (out.position[neg] == -1).all() and np.all(np.diff(out.time_ms) >= 0)
    # a negative carries the history of the impression it was drawn beside
    assert all(out.hist_items[i, 0] == 3 * (out.time_ms[i] // 10) for i in np.nonzero(neg)[0])


def test_query_context_dropout_blanks_only_category_and_query_fields():
    from training.data.examples import Impressions
    from training.evaluation.ranking import drop_query_context

    n = 400
    imp = Impressions(np.ones((n, 3), np.int64), np.ones((n, 3), np.int64), np.ones((n, 3), np.int64),
                      np.arange(1, 9)[None].repeat(n, 0), np.arange(1, n + 1), np.zeros(n, np.int64),
                      np.zeros((n, 4), np.float32), np.arange(n))
    out = drop_query_context(imp, p=0.5, seed=0)
    blank = (out.context[:, 3:] == 0).all(1)
    assert 0.4 < blank.mean() < 0.6
    assert (out.context[:, :3] == imp.context[:, :3]).all() and (out.context[~blank] == imp.context[~blank]).all()
    assert (imp.context[:, 3:] > 0).all()  # the input is not modified


def test_fusion_with_retrieval_keeps_an_item_both_orders_agree_on_at_the_top():
    from training.evaluation.ranking import fused_with_retrieval, rerank

    scores = np.array([[0.1, 0.9, 0.5, 0.2]])  # ranker: 2nd, 3rd, 4th, 1st; retrieval: the given order
    fused = fused_with_retrieval(scores)
    cands = np.array([[11, 12, 13, 14]])
    assert rerank(fused, cands, 2)[0].tolist() == [12, 11]  # ranker 1st + retrieval 2nd beats ranker 4th + 1st
    assert np.allclose(fused_with_retrieval(-np.arange(4.0)[None]), 2.0 / (60 + np.arange(1, 5)))  # agreement


def _seed_results(own: float, fused: float, retrieval: float, truth: bool = True) -> dict:
    m = {"ndcg@10": own, "fused_ndcg@10": fused}
    if truth:
        m["true_ndcg@10"] = {"combined": own * 4, "click": own * 4, "fused": fused * 4}
    out = {"retrieval_order_ndcg@10": retrieval, "models": {"ranker": m}}
    return out | ({"true_relevance_order_ndcg@10": {"retrieval": retrieval * 4}} if truth else {})


def test_the_spread_over_seeds_pairs_each_order_with_retrievals_of_the_same_seed():
    from training.evaluation.ranking import ranking_seed_spread, seed_spread_markdown

    runs = [_seed_results(0.12, 0.15, 0.13), _seed_results(0.10, 0.16, 0.12), _seed_results(0.11, 0.17, 0.14)]
    spread = ranking_seed_spread(runs, [0, 1, 2])
    own, fused = spread["models"]["ranker"]["ndcg@10"], spread["models"]["ranker"]["fused_ndcg@10"]
    assert own["values"] == [0.12, 0.10, 0.11] and own["mean"] == pytest.approx(0.11)
    assert own["std"] == pytest.approx(0.01) and spread["retrieval"]["ndcg@10"]["mean"] == pytest.approx(0.13)
    against = spread["models"]["ranker"]["against_retrieval"]
    assert against["ndcg@10"]["mean_difference"] == pytest.approx(-0.02) and not against["ndcg@10"]["beats_retrieval"]
    assert against["fused_ndcg@10"]["mean_difference"] == pytest.approx(0.03)  # +0.02, +0.04, +0.03: sd 0.01
    assert against["fused_ndcg@10"]["beats_retrieval"] and against["true_fused_ndcg@10"]["beats_retrieval"]
    md = seed_spread_markdown(spread)
    assert "| ranker | 0.110 ± 0.010 | 0.160 ± 0.010 |" in md and "ranker (fused_ndcg@10, true_fused_ndcg@10)" in md
    assert "| retrieval's own | 0.130 ± 0.010 |" in md
    no_truth = ranking_seed_spread([_seed_results(0.1, 0.2, 0.1, truth=False)] * 2, [0, 1])
    assert no_truth["retrieval"]["true_ndcg@10"] is None and "n/a" in seed_spread_markdown(no_truth)
    assert set(no_truth["models"]["ranker"]["against_retrieval"]) == {"ndcg@10", "fused_ndcg@10"}
    with pytest.raises(ValueError, match="2 runs for 3 seeds"):
        ranking_seed_spread(runs[:2], [0, 1, 2])
