"""Splits: no leakage (targets after histories, held-out events absent from training), seen items."""
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.data.features import engagements_of, time_ms
from training.data.splits import leave_last_out, temporal
from training.data.synthetic import generate_shop


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














