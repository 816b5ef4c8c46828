"""The sampled protocol (for comparison with papers only): negatives avoid seen and target items, the metrics rank
an oracle first and an adversary last."""
import numpy as np
import pytest

from training.data.splits import leave_last_out
from training.data.synthetic import generate_shop
from training.evaluation.protocols import ranked_to_scores, sample_trials, sampled_ranking_metrics


@pytest.fixture(scope="module")
def llo():
    return leave_last_out(generate_shop("tiny", 0), dataset="tiny")


def test_ranked_to_scores_orders_listed_items_and_puts_unlisted_below() -> None:
    ranked = np.array([[5, 3, 9], [1, 2, 4]])
    items = np.array([[3, 9, 7], [4, 1, 8]])
    s = ranked_to_scores(ranked, np.array([0, 1]), items, np.random.default_rng(0))
    assert s[0, 0] > s[0, 1] > s[0, 2] and s[1, 1] > s[1, 0] > s[1, 2]
    assert s[0, 0] == 2 and s[1, 1] == 3 and s[0, 2] < 0


def test_sampled_metrics_oracle_and_adversary(llo) -> None:
    target = np.array([t[0] for t in llo.targets])

    def oracle(rows, items):
        return (items == target[rows][:, None]).astype(float)

    perfect = sampled_ranking_metrics(llo, scores_fn=oracle, sampler="uniform")
    worst = sampled_ranking_metrics(llo, scores_fn=lambda r, i: -oracle(r, i), sampler="popularity")
    assert perfect["hr@1"] == 1.0 and perfect["ndcg@10"] == 1.0
    assert worst["hr@10"] == 0.0 and worst["trials"] == len(llo.user_ids)
    assert "only for comparison with papers" in perfect["protocol"]


def test_sampled_negatives_avoid_seen_and_target_items(llo) -> None:
    captured = {}

    def spy(rows, items):
        captured["rows"], captured["items"] = rows, items
        return np.zeros(items.shape)

    out = sampled_ranking_metrics(llo, scores_fn=spy, n_negatives=100, sampler="popularity", seed=1)
    rows, items = captured["rows"], captured["items"]
    assert items.shape == (len(rows), 101)
    for r, cand in zip(rows, items):
        neg = cand[1:]
        assert len(set(neg.tolist())) == 100 and not np.isin(neg, llo.seen[r]).any() and llo.targets[r][0] not in neg
    assert out["hr@10"] == 0.0  # all tied: ties count against the target


def test_sampled_metrics_from_ranked_lists_find_a_top_ranked_target(llo) -> None:
    ranked = np.zeros((len(llo.user_ids), 500), dtype=np.int64)
    ranked[:, 0] = [t[0] for t in llo.targets]
    assert sampled_ranking_metrics(llo, ranked=ranked)["hr@1"] == 1.0
    with pytest.raises(ValueError, match="exactly one"):
        sampled_ranking_metrics(llo)
    with pytest.raises(ValueError, match="sampler"):
        sampled_ranking_metrics(llo, ranked=ranked, sampler="zipf")


@pytest.mark.parametrize("sampler", ["popularity", "uniform"])
def test_sample_trials_draws_distinct_allowed_negatives(llo, sampler) -> None:
    trials = sample_trials(llo, n_negatives=100, sampler=sampler, seed=2)
    assert trials.items.shape == (len(llo.user_ids), 101)
    np.testing.assert_array_equal(trials.items[:, 0], [t[0] for t in llo.targets])
    for r, cand in zip(trials.rows, trials.items):
        neg = cand[1:]
        assert len(np.unique(neg)) == 100 and neg.min() >= 1 and not np.isin(neg, llo.seen[r]).any()
        assert llo.targets[r][0] not in neg


def test_popularity_sampler_prefers_popular_items_uniform_does_not(llo) -> None:
    pop = sample_trials(llo, sampler="popularity", seed=0).items[:, 1:]
    uni = sample_trials(llo, sampler="uniform", seed=0).items[:, 1:]
    mean_pop = llo.popularity.mean()
    assert llo.popularity[pop].mean() > 3 * mean_pop
    assert llo.popularity[uni].mean() == pytest.approx(mean_pop, rel=0.2)


def test_sample_trials_finishes_users_who_have_seen_almost_everything(llo) -> None:
    import copy

    task = copy.copy(llo)
    everything = np.arange(1, llo.space.n_items + 1)
    task.seen = [np.setdiff1d(everything, np.r_[t, everything[:5]]) for t in llo.targets]  # 5 items left to draw
    trials = sample_trials(task, n_negatives=100, sampler="uniform")
    for r, cand in zip(trials.rows, trials.items):
        left = np.setdiff1d(everything[:5], llo.targets[r])
        np.testing.assert_array_equal(np.sort(cand[1:][cand[1:] > 0]), left)
