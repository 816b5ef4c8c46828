"""Feature encoding and example building: histories never look into the future."""
from __future__ import annotations

import numpy as np
import pyarrow.compute as pc

from training.data.examples import eval_set, impressions, temporal_split, tower_examples
from training.data.features import (CONTEXT_COLUMNS, N_AGE_BUCKETS, age_bucket, build_feature_space, encode_context,
                               encode_history, engagements_of, histories_at, item_feature_table, query_tokens)
from training.data.synthetic import generate_shop


def _shop():
    return generate_shop("tiny", seed=0)


def test_history_holds_only_earlier_engagements_of_the_same_user_most_recent_last():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events, history_len=5)
    eng = engagements_of(shop.events, space)
    u = int(np.bincount(eng.user_code).argmax())  # the most active user
    mine = eng.user_code == u
    t = eng.time_ms[mine]
    at = int(t[len(t) // 2])
    items, actions, ages = histories_at(eng, np.array([u]), np.array([at]), 5)
    expected = eng.item_idx[mine][t < at][-5:]
    assert items[0, 5 - len(expected):].tolist() == expected.tolist()
    assert (actions[0, 5 - len(expected):] > 0).all()
    assert (np.diff(ages[0, 5 - len(expected):]) <= 0).all()  # older actions are at least as old in buckets


def test_a_user_without_earlier_engagements_gets_an_all_padding_history():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    eng = engagements_of(shop.events, space)
    items, actions, ages = histories_at(eng, np.array([0]), np.array([0]), 4)
    assert items.tolist() == [[0, 0, 0, 0]] and actions.tolist() == [[0, 0, 0, 0]] and not ages.any()


def test_temporal_split_puts_every_test_event_after_every_train_event():
    split = temporal_split(_shop().events, 0.1)
    assert pc.max(split.train.column("timestamp")).value < pc.min(split.test.column("timestamp")).value
    assert 0.05 < len(split.test) / (len(split.train) + len(split.test)) < 0.15


def test_eval_targets_are_future_items_never_seen_before_the_cutoff():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    ev = eval_set(temporal_split(shop.events, 0.2), space, max_users=None)
    assert len(ev.user_ids) > 10
    for targets, seen in zip(ev.targets, ev.seen):
        assert len(targets) and not set(targets) & set(seen)


def test_tower_examples_target_known_items_and_impression_labels_follow_the_funnel():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    ex = tower_examples(shop.events, space)
    assert len(ex) > 0 and (ex.target > 0).all() and ex.hist_items.shape == (len(ex), space.history_len)
    imp = impressions(shop.events, space, engagements_of(shop.events, space))
    click, purchase = imp.labels[:, 0], imp.labels[:, 3]
    assert 0.02 < click.mean() < 0.3
    assert (purchase <= click).all()  # no purchase of a shown item without a click on it


def test_encode_history_right_aligns_and_drops_items_unknown_to_the_bundle():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events, history_len=4)
    items, actions, ages = encode_history(space, ["i1", "not-an-item", "i2"], ["click", "purchase", "click"],
                                          [100.0, 200.0, 1000.0], now_s=1000.0 + 3600.0)
    assert items[0, 0] == 0 and items[0, 2] == 0 and items[0, 1] > 0 and items[0, 3] > 0
    assert actions[0, 2] == 0 and ages[0, 2] == 0  # unknown item carries no action or age either
    assert ages[0, 1] >= ages[0, 3] == age_bucket(np.array([3_600_000]))[0]


def test_age_buckets_grow_with_log_time_and_cap():
    b = age_bucket(np.array([0, 59_000, 61_000, 3_600_000, 86_400_000, 10**13, -5]))
    assert b[0] == 1 and b[1] == 1 and b[2] == 2 and b[3] < b[4] < b[5] == N_AGE_BUCKETS - 1 and b[6] == 1


def test_context_hashes_query_tokens_and_looks_up_the_category():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    cat = space.categories[0]
    ctx = encode_context(space, ["nowhere", None], [None, None], [None, None], [cat, None], ["Red Shoes", None])
    assert ctx.shape == (2, len(CONTEXT_COLUMNS))
    assert ctx[0, 3] == 1 and ctx[0, 4] > 0 and ctx[0, 5] > 0 and ctx[0, 6] == 0 and ctx[0, 0] == 0
    assert (ctx[0, 4:6] == query_tokens(["red shoes"])[0, :2]).all() and not ctx[1].any()


def test_item_feature_table_rows_follow_item_indices():
    shop = _shop()
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    feats = item_feature_table(shop.catalog, space)
    row = 17
    assert feats.item_idx[row + 1] == row + 1
    assert space.brands[feats.brand_idx[row + 1] - 1] == shop.catalog.column("brand")[row].as_py()
