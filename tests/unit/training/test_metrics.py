"""Offline metrics: hand-computed examples, exclusion and padding rules, AUC against a brute-force pair count."""

import math

import numpy as np
import pytest

from training.metrics import (
    evaluate_ranked,
    hit_rate_at_k,
    log_loss,
    ndcg_at_k,
    popularity_counts,
    recall_at_k,
    roc_auc,
    top_k_excluding,
)


def test_top_k_returns_best_columns_first() -> None:
    scores = np.array([[9.0, 0.1, 0.5, 0.3, 0.9], [9.0, 0.4, 0.2, 0.8, 0.6]])
    ranked = top_k_excluding(scores, 3)
    assert ranked.dtype == np.int64
    np.testing.assert_array_equal(ranked, [[4, 2, 3], [3, 4, 1]])


def test_top_k_never_returns_padding_column_even_when_it_scores_highest() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 20))
    scores[:, 0] = 1e9
    ranked = top_k_excluding(scores, 19)
    assert not (ranked == 0).any()
    assert (np.sort(ranked, axis=1) == np.arange(1, 20)).all()


def test_top_k_honours_per_row_exclusions() -> None:
    scores = np.array([[0.0, 5.0, 4.0, 3.0, 2.0], [0.0, 5.0, 4.0, 3.0, 2.0]])
    ranked = top_k_excluding(scores, 2, exclude=[np.array([1, 3]), np.array([], dtype=np.int64)])
    np.testing.assert_array_equal(ranked, [[2, 4], [1, 2]])


def test_top_k_pads_with_minus_one_when_too_few_eligible() -> None:
    scores = np.array([[0.0, 1.0, 2.0, 3.0]])
    ranked = top_k_excluding(scores, 6, exclude=[np.array([2])])
    np.testing.assert_array_equal(ranked, [[3, 1, -1, -1, -1, -1]])


def test_top_k_keeps_eligible_items_with_minus_inf_scores_before_padding() -> None:
    scores = np.array([[0.0, -np.inf, 2.0]])
    np.testing.assert_array_equal(top_k_excluding(scores, 3), [[2, 1, -1]])


def test_top_k_matches_full_sort_across_chunks() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(600, 300)).astype(np.float32)  # > one chunk of rows
    exclude = [rng.choice(np.arange(1, 300), size=rng.integers(0, 40), replace=False) for _ in range(600)]
    ranked = top_k_excluding(scores, 25, exclude=exclude)
    for i in range(0, 600, 37):
        masked = scores[i].astype(np.float64)
        masked[0] = -np.inf
        masked[exclude[i]] = -np.inf
        np.testing.assert_array_equal(ranked[i], np.argsort(-masked, kind="stable")[:25])


def test_recall_hand_computed_skips_rows_without_targets() -> None:
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    targets = [np.array([2, 9]), np.array([], dtype=np.int64), np.array([9, 1, 2, 3])]
    # row 0: {2} of {2, 9} in top 2 -> 1/2; row 2: {} of 4 in top 2 -> 0; row 1 skipped.
    assert recall_at_k(ranked, targets, 2) == pytest.approx(0.25)
    # top 3: row 0 -> 1/2, row 2 -> {9}/4 = 1/4
    assert recall_at_k(ranked, targets, 3) == pytest.approx((0.5 + 0.25) / 2)


def test_recall_ignores_minus_one_padding() -> None:
    ranked = np.array([[-1, -1, 3]])
    assert recall_at_k(ranked, [np.array([3])], 2) == 0.0
    assert recall_at_k(ranked, [np.array([3])], 3) == 1.0


def test_hit_rate_hand_computed() -> None:
    ranked = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1, 1]])
    targets = [np.array([3]), np.array([4]), np.array([1]), np.array([], dtype=np.int64)]
    assert hit_rate_at_k(ranked, targets, 1) == pytest.approx(1 / 3)
    assert hit_rate_at_k(ranked, targets, 3) == pytest.approx(2 / 3)


def test_ndcg_hand_computed() -> None:
    ranked = np.array([[5, 7, 9, 11]])
    # hits at ranks 1 and 3 (0-based): DCG = 1/log2(3) + 1/log2(5); |T| = 3 -> ideal over 3 slots.
    targets = [np.array([7, 11, 100])]
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg_at_k(ranked, targets, 4) == pytest.approx(dcg / ideal)
    # k = 2: only the hit at rank 1 counts, ideal uses min(|T|, 2) = 2 hits.
    assert ndcg_at_k(ranked, targets, 2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))


def test_ndcg_is_one_for_perfect_ranking() -> None:
    ranked = np.array([[3, 1, 2, 8]])
    assert ndcg_at_k(ranked, [np.array([1, 3])], 4) == pytest.approx(1.0)


def test_evaluate_ranked_reports_every_metric_and_user_count() -> None:
    ranked = np.array([[1, 2], [3, 4], [5, 6]])
    targets = [np.array([2]), np.array([9]), np.array([], dtype=np.int64)]
    out = evaluate_ranked(ranked, targets, ks=(1, 2))
    assert set(out) == {"recall@1", "ndcg@1", "hr@1", "recall@2", "ndcg@2", "hr@2", "users"}
    assert out["users"] == 2
    assert out["recall@1"] == 0.0
    assert out["hr@2"] == pytest.approx(0.5)
    assert out["ndcg@2"] == pytest.approx(0.5 / math.log2(3))


def test_ranking_metrics_reject_k_beyond_ranked_columns() -> None:
    with pytest.raises(ValueError, match="k must be"):
        recall_at_k(np.array([[1, 2]]), [np.array([1])], 3)


def test_roc_auc_hand_computed_with_ties() -> None:
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    # pairs (pos, neg): (0.9, 0.5) win, (0.9, 0.1) win, (0.5, 0.5) tie, (0.5, 0.1) win -> 3.5 / 4
    assert roc_auc(labels, scores) == pytest.approx(0.875)


def test_roc_auc_is_nan_with_one_class() -> None:
    assert math.isnan(roc_auc(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_brute_force_pair_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=300)
    scores = np.round(rng.normal(size=300) + labels, 1)  # rounding creates many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert roc_auc(labels, scores) == pytest.approx(wins / (pos.size * neg.size))


def test_log_loss_hand_computed_and_clipped() -> None:
    assert log_loss(np.array([1, 0]), np.array([0.8, 0.4])) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert log_loss(np.array([1]), np.array([0.0]), eps=1e-7) == pytest.approx(-math.log(1e-7))


def test_popularity_counts_ignore_padding_index() -> None:
    counts = popularity_counts(np.array([0, 1, 3, 3, 0, 3]), n_items=4)
    assert counts.dtype == np.float64
    np.testing.assert_array_equal(counts, [0, 1, 0, 3, 0])


def test_popularity_counts_reject_out_of_range_index() -> None:
    with pytest.raises(ValueError, match="item_idx"):
        popularity_counts(np.array([5]), n_items=4)


# --- harness metrics ------------------------------------------------------------------------------------------------

from training.metrics import brand_diversity, catalog_coverage, novelty_recall, per_user_at_k  # noqa: E402


def test_per_user_at_k_hand_values_and_nan_for_rows_without_targets() -> None:
    ranked = np.array([[3, 1, 2], [2, 4, 0], [1, 2, 3]])
    targets = [np.array([1, 5]), np.array([], dtype=np.int64), np.array([3])]
    out = per_user_at_k(ranked, targets, 3)
    np.testing.assert_allclose(out["recall"], [0.5, np.nan, 1.0])
    np.testing.assert_allclose(out["hr"], [1.0, np.nan, 1.0])
    # row 0: hit at rank 1 -> 1/log2(3); ideal for 2 targets: 1 + 1/log2(3). row 2: hit at rank 2 -> 1/log2(4) = 0.5
    np.testing.assert_allclose(out["ndcg"], [(1 / math.log2(3)) / (1 + 1 / math.log2(3)), np.nan, 0.5])
    assert np.nanmean(out["ndcg"]) == pytest.approx(ndcg_at_k(ranked, targets, 3))


def test_novelty_recall_counts_only_new_targets() -> None:
    created = np.array([0, 10, 20, 300, 400])  # items 3 and 4 are new after t = 100
    ranked = np.array([[3, 1], [1, 2], [2, 1]])
    targets = [np.array([3, 4]), np.array([4]), np.array([1])]
    value, users = novelty_recall(ranked, targets, created, 100, 2)
    assert users == 2 and value == pytest.approx((0.5 + 0.0) / 2)
    value, users = novelty_recall(ranked, [np.array([1])] * 3, created, 100, 2)
    assert users == 0 and math.isnan(value)


def test_brand_diversity_longest_run_and_unique_brands() -> None:
    brand = np.array([0, 7, 7, 8, 7, 9, 9])  # item -> brand
    ranked = np.array([[1, 2, 4, 3, 5, 6],   # 7 7 7 8 9 9: run 3, 3 brands
                       [1, 3, 2, 0, 0, 0],   # 7 8 7 then padding: run 1, 2 brands
                       [0, 0, 0, 0, 0, 0]])  # empty list
    run, unique = brand_diversity(ranked, brand, k=6)
    np.testing.assert_array_equal(run, [3, 1, 0])
    np.testing.assert_array_equal(unique, [3, 2, 0])
    run5, _ = brand_diversity(ranked, brand, k=2)
    np.testing.assert_array_equal(run5, [2, 1, 0])


def test_catalog_coverage_is_share_of_items_in_any_top_k() -> None:
    ranked = np.array([[1, 2, 9], [2, 3, 8], [0, -1, 7]])
    assert catalog_coverage(ranked, 10, 2) == pytest.approx(3 / 10)  # items 1, 2, 3; padding not counted
    assert catalog_coverage(ranked, 10, 3) == pytest.approx(6 / 10)
    with pytest.raises(ValueError, match="n_items"):
        catalog_coverage(ranked, 0, 2)
