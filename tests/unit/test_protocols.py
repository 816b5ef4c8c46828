"""Protocols: no leakage (targets after histories, held-out events absent from training), seen items, sampled ranks."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.features import engagements_of, time_ms
from training.protocols import leave_last_out, ranked_to_scores, sample_trials, sampled_ranking_metrics, temporal
from training.synthetic import generate_shop


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", 0)


@pytest.fixture(scope="module")
def llo(shop):
    return leave_last_out(shop, dataset="tiny")


def _engagements_by_user(events: pa.Table, space) -> dict[str, list[tuple[int, int]]]:
    eng = engagements_of(events, space)
    out: dict[str, list[tuple[int, int]]] = {}
    for c, t, i in zip(eng.user_code, eng.time_ms, eng.item_idx):
        out.setdefault(eng.users[c], []).append((int(t), int(i)))
    return out


def test_leave_last_out_target_is_the_last_first_time_engagement(shop, llo) -> None:
    full = _engagements_by_user(shop.events, llo.space)
    for u, target, at in zip(llo.user_ids, llo.targets, llo.at_ms):
        events = full[u]
        first_time = {}
        for t, i in events:
            first_time.setdefault(i, t)
        last_item = max(first_time, key=lambda i: (first_time[i], [x for _, x in events].index(i)))
        assert target.tolist() == [last_item] and first_time[last_item] == at


def test_leave_last_out_history_is_strictly_before_the_target(shop, llo) -> None:
    full = _engagements_by_user(shop.events, llo.space)
    for row, (u, at) in enumerate(zip(llo.user_ids, llo.at_ms)):
        before = {i for t, i in full[u] if t < at}
        hist = set(llo.hist_items[row][llo.hist_items[row] > 0].tolist())
        assert hist and hist <= before
        assert set(llo.seen[row].tolist()) == before
        assert not np.isin(llo.targets[row], llo.seen[row]).any()
    assert (llo.hist_ages[llo.hist_items > 0] >= 1).all()


def test_leave_last_out_train_events_lack_every_held_out_event(llo) -> None:
    at = dict(zip(llo.user_ids, llo.at_ms.tolist()))
    t = time_ms(llo.train_events["timestamp"])
    users = llo.train_events["user_id"].to_pylist()
    assert all(ti < at[u] for u, ti in zip(users, t) if u in at)
    train = _engagements_by_user(llo.train_events, llo.space)
    for u, target in zip(llo.user_ids, llo.targets):
        assert target[0] not in {i for _, i in train.get(u, [])}


def test_leave_last_out_popularity_counts_only_training_engagements(llo) -> None:
    eng = engagements_of(llo.train_events, llo.space)
    np.testing.assert_array_equal(llo.popularity, np.bincount(eng.item_idx, minlength=llo.space.n_items + 1))


def test_leave_last_out_sample_is_seeded_and_keeps_training_data(shop, llo) -> None:
    a = leave_last_out(shop, max_users=50, seed=3)
    b = leave_last_out(shop, max_users=50, seed=3)
    assert len(a.user_ids) == 50 and a.user_ids == b.user_ids
    assert a.train_events.num_rows == llo.train_events.num_rows
    np.testing.assert_array_equal(a.user_rows, [int(u[1:]) for u in a.user_ids])  # "u<n>" is row n


def test_leave_last_out_context_does_not_carry_the_target_page_or_query(llo) -> None:
    assert (llo.context[:, 3:] == 0).all()  # no category, no query tokens
    assert len(set(llo.context[:, 2].tolist())) == 1  # the same page (home) for everyone


def test_temporal_learns_only_before_the_cutoff(shop) -> None:
    task = temporal(shop, test_fraction=0.1)
    cutoff = int(task.at_ms[0])
    assert (task.at_ms == cutoff).all() and task.new_after_ms == cutoff
    assert (time_ms(task.train_events["timestamp"]) < cutoff).all()
    for row, (target, seen) in enumerate(zip(task.targets, task.seen)):
        assert len(target) and not np.isin(target, seen).any()
    test = shop.events.filter(pc.greater_equal(pc.cast(shop.events["timestamp"], pa.int64()), cutoff))
    after = _engagements_by_user(test, task.space)
    for u, target in zip(task.user_ids, task.targets):
        assert set(target.tolist()) <= {i for _, i in after[u]}


def test_user_inputs_returns_rows_in_user_tower_order(llo) -> None:
    items, actions, ages, ctx = llo.user_inputs(np.array([2, 0]))
    np.testing.assert_array_equal(items, llo.hist_items[[2, 0]])
    np.testing.assert_array_equal(ctx, llo.context[[2, 0]])
    assert actions.shape == ages.shape == items.shape


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
