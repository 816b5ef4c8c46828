"""The synthetic shop: deterministic, valid, funnel-consistent, position-biased and learnable."""

import dataclasses
import re
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.data.schemas import CATALOG_SCHEMA, EVENTS_SCHEMA, USERS_SCHEMA, read_shop, snapshot_id, validate_table, write_shop
from training.data.synthetic import POSITION_BIAS_ETA, SIZES, generate_shop, position_bias, true_relevance


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", seed=0)


def index_of(column: pa.ChunkedArray) -> np.ndarray:
    """'i42' -> 42: synthetic ids are their row index with a one-letter prefix."""
    return pc.utf8_slice_codeunits(column, 1).cast(pa.int64()).to_numpy()


def as_ms(column: pa.ChunkedArray) -> np.ndarray:
    return column.cast(pa.int64()).to_numpy()


def actions(shop) -> np.ndarray:
    return shop.events["action"].to_numpy(zero_copy_only=False)


def test_same_seed_gives_identical_tables(shop) -> None:
    again = generate_shop("tiny", seed=0)
    assert again.catalog.equals(shop.catalog) and again.users.equals(shop.users) and again.events.equals(shop.events)
    assert again.meta == shop.meta
    for key, value in shop.hidden.items():
        np.testing.assert_array_equal(again.hidden[key], value)


def test_same_seed_gives_byte_identical_files(shop, tmp_path) -> None:
    write_shop(shop, tmp_path / "a")
    write_shop(generate_shop("tiny", seed=0), tmp_path / "b")
    assert snapshot_id(tmp_path / "a") == snapshot_id(tmp_path / "b")


def test_different_seed_gives_different_events(shop) -> None:
    other = generate_shop("tiny", seed=1)
    assert not other.events.equals(shop.events)
    assert not np.array_equal(other.hidden["item_latent"], shop.hidden["item_latent"])


def test_tiny_has_the_configured_counts(shop) -> None:
    size = SIZES["tiny"]
    assert shop.catalog.num_rows == size.n_items and shop.users.num_rows == size.n_users
    assert pc.count_distinct(shop.catalog["category"]).as_py() == size.n_categories
    assert shop.events.num_rows > size.n_users * size.items_per_session  # at least a session's views per user


def test_sizes_are_named_and_ordered() -> None:
    assert set(SIZES) == {"tiny", "small", "demo", "large"}
    assert SIZES["tiny"].n_items < SIZES["demo"].n_items < SIZES["large"].n_items == 1_000_000


def test_unknown_size_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"'huge'.*demo.*large.*tiny"):
        generate_shop("huge")


def test_custom_size_is_accepted() -> None:
    size = dataclasses.replace(SIZES["tiny"], n_items=300, n_users=50, items_per_session=5)
    small = generate_shop(size, seed=3)
    assert small.catalog.num_rows == 300 and small.meta["size"] == "custom"
    assert pc.max(small.events["position"]).as_py() <= 4


def test_tables_follow_the_schemas(shop) -> None:
    for table, schema in ((shop.catalog, CATALOG_SCHEMA), (shop.users, USERS_SCHEMA), (shop.events, EVENTS_SCHEMA)):
        assert table.schema.equals(schema)
        assert validate_table(table, schema, "t").equals(table)


def test_shop_survives_a_write_read_round_trip(shop, tmp_path) -> None:
    write_shop(shop, tmp_path)
    loaded = read_shop(tmp_path)
    assert loaded.events.equals(shop.events) and loaded.meta == shop.meta
    np.testing.assert_array_equal(loaded.hidden["user_interest_category"], shop.hidden["user_interest_category"])


def test_events_are_sorted_by_time_and_meta_ends_at_last_event(shop) -> None:
    ts = as_ms(shop.events["timestamp"])
    assert np.all(np.diff(ts) >= 0)
    end = datetime.fromisoformat(shop.meta["end_time"].replace("Z", "+00:00"))
    assert int(end.timestamp() * 1000) == ts[-1]
    assert shop.meta["source"] == "synthetic" and shop.meta["position_bias_eta"] == POSITION_BIAS_ETA


def test_hidden_arrays_follow_table_row_order(shop) -> None:
    size, h = SIZES["tiny"], shop.hidden
    assert h["item_latent"].shape == (size.n_items, 16) and h["item_latent"].dtype == np.float32
    assert h["user_interest_category"].shape == (size.n_users, 4)
    assert h["category_centre"].shape == (size.n_categories, 16)
    np.testing.assert_allclose(h["user_interest_weight"].sum(axis=1), 1.0, rtol=1e-5)
    n = h["user_n_interests"]
    assert n.min() == 1 and n.max() == 4
    assert np.all((h["user_interest_category"] >= 0) == (np.arange(4)[None, :] < n[:, None]))
    assert np.array_equal(index_of(shop.catalog["item_id"]), np.arange(size.n_items))
    # The category column agrees with the latent: an item is closest to its own category centre far more than chance.
    nearest = np.argmax(h["item_latent"] @ h["category_centre"].T, axis=1)
    assert np.mean(nearest == index_of(shop.catalog["category"])) > 0.8


def test_positions_are_within_the_screen(shop) -> None:
    pos = shop.events["position"].to_numpy()
    assert pos.min() == 0 and pos.max() == SIZES["tiny"].items_per_session - 1


def test_every_purchase_follows_an_add_to_cart_of_the_same_user_and_item(shop) -> None:
    ev = shop.events
    act, ts = actions(shop), as_ms(ev["timestamp"])
    key = np.char.add(np.char.add(ev["user_id"].to_numpy(zero_copy_only=False).astype(str), "|"),
                      ev["item_id"].to_numpy(zero_copy_only=False).astype(str))
    first_cart = {}
    for k, t in zip(key[act == "add_to_cart"], ts[act == "add_to_cart"]):
        first_cart.setdefault(k, t)
    purchases = list(zip(key[act == "purchase"], ts[act == "purchase"]))
    assert purchases
    assert all(k in first_cart and first_cart[k] < t for k, t in purchases)


def test_funnel_counts_shrink_step_by_step(shop) -> None:
    counts = {a: int(np.sum(actions(shop) == a)) for a in ("view", "click", "add_to_cart", "purchase")}
    assert counts["view"] > counts["click"] > counts["add_to_cart"] > counts["purchase"] > 0
    assert 0.05 <= counts["click"] / counts["view"] <= 0.15


def test_click_through_falls_with_position(shop) -> None:
    act, pos = actions(shop), shop.events["position"].to_numpy()
    ctr = np.array([np.sum((act == "click") & (pos == p)) / np.sum((act == "view") & (pos == p)) for p in range(12)])
    assert ctr[0] > ctr[2] > ctr[5] > ctr[11]
    assert ctr[0] > 3 * ctr[11]


def test_position_bias_matches_its_formula() -> None:
    np.testing.assert_allclose(position_bias(np.array([0, 1, 3])), [1.0, 0.5**0.8, 0.25**0.8])
    assert position_bias(np.array([4]), eta=0.0)[0] == 1.0


def test_examination_curves_match_their_formulas_and_parse_from_specs_and_meta() -> None:
    from training.data.synthetic import Examination

    pos = np.array([0, 1, 3])
    np.testing.assert_allclose(Examination().probability(pos), position_bias(pos))
    np.testing.assert_allclose(Examination.parse("log:1").probability(pos), 1 / np.log2(2 + pos))
    np.testing.assert_allclose(Examination.parse("exponential:0.5").probability(pos), [1.0, 0.5, 0.125])
    assert Examination.parse("exponential").param == 0.7 and Examination.parse("power").spec == "power:0.8"
    assert Examination.of_meta({"position_bias_eta": 0.5}) == Examination("power", 0.5)
    assert Examination.of_meta({"examination": "log:2"}) == Examination("log", 2.0)
    np.testing.assert_allclose(Examination.parse("exponential:0.5").log_effect(3), np.log([1.0, 0.5, 0.25]))
    for bad, says in (("cascade", "valid curves"), ("exponential:1.5", "in (0, 1)"), ("power:-1", ">= 0"),
                      ("log:x", "a number")):
        with pytest.raises(ValueError, match=re.escape(says)):
            Examination.parse(bad)


def test_a_shop_made_with_another_examination_curve_records_it_and_its_clicks_follow_it() -> None:
    from training.data.synthetic import Examination

    steep = generate_shop("tiny", seed=0, examination=Examination.parse("exponential:0.6"))
    assert steep.meta["examination"] == "exponential:0.6" and "position_bias_eta" not in steep.meta
    assert Examination.of_meta(steep.meta) == Examination("exponential", 0.6)
    default = generate_shop("tiny", seed=0)
    assert "examination" not in default.meta  # the default shop is byte-identical to before the curve was recorded

    def ctr(shop, p: int) -> float:
        act, pos = actions(shop), shop.events["position"].to_numpy()
        return np.sum((act == "click") & (pos == p)) / np.sum((act == "view") & (pos == p))

    # The same sessions and lists, so the drop from position 0 to 6 differs by the curves' ratio (0.047 / 0.21)
    steep_drop, default_drop = ctr(steep, 6) / ctr(steep, 0), ctr(default, 6) / ctr(default, 0)
    assert steep_drop < 0.5 * default_drop, (steep_drop, default_drop)


def test_new_items_exist_and_no_event_precedes_its_item(shop) -> None:
    created = as_ms(shop.catalog["created_at"])
    end_ms = as_ms(shop.events["timestamp"])[-1]
    window_ms = timedelta(days=SIZES["tiny"].new_item_days) / timedelta(milliseconds=1)
    assert np.sum(created >= end_ms - window_ms) >= 0.5 * SIZES["tiny"].new_item_fraction * len(created)
    items = index_of(shop.events["item_id"])
    assert np.all(as_ms(shop.events["timestamp"]) >= created[items])


def test_clicks_concentrate_on_hidden_interest_categories(shop) -> None:
    act = actions(shop)
    users, items = index_of(shop.events["user_id"]), index_of(shop.events["item_id"])
    item_cat = index_of(shop.catalog["category"])
    interest = shop.hidden["user_interest_category"]
    clicked = act == "click"
    hit = (interest[users[clicked]] == item_cat[items[clicked]][:, None]).any(axis=1).mean()
    # Chance: the share of the catalog that lies in each clicking user's interest categories.
    share = np.bincount(item_cat, minlength=SIZES["tiny"].n_categories) / len(item_cat)
    chance = np.mean([share[np.unique(c[c >= 0])].sum() for c in interest[users[clicked]]])
    assert hit > 0.8 and hit > 2.5 * chance


def test_past_click_categories_beat_global_popularity(shop) -> None:
    """A model that knows the user's earlier clicked categories must clearly beat popularity on later clicks."""
    act, ts = actions(shop), as_ms(shop.events["timestamp"])
    users, items = index_of(shop.events["user_id"]), index_of(shop.events["item_id"])
    item_cat = index_of(shop.catalog["category"])
    n_users, n_items, n_cat = shop.users.num_rows, shop.catalog.num_rows, SIZES["tiny"].n_categories
    split = np.quantile(ts, 0.7)
    train, test = (act == "click") & (ts < split), (act == "click") & (ts >= split)
    popularity = np.bincount(items[train], minlength=n_items).astype(float)
    affinity = np.zeros((n_users, n_cat))
    np.add.at(affinity, (users[train], item_cat[items[train]]), 1.0)
    share = (affinity + 0.01) / (affinity.sum(axis=1, keepdims=True) + 0.01 * n_cat)  # smoothed P(category | user)
    scores = share[:, item_cat] * (popularity + 1.0)[None, :]  # (U, I): popularity within the user's categories

    def recall_at(scores_u: np.ndarray, k: int = 20) -> float:
        top = np.argsort(-scores_u, axis=1)[:, :k]
        hits = [items[test & (users == u)] for u in range(n_users)]
        return np.mean([np.isin(h, top[u]).mean() for u, h in enumerate(hits) if len(h)])

    personal, popular = recall_at(scores), recall_at(np.broadcast_to(popularity, (n_users, n_items)))
    assert personal > 1.5 * popular


def test_true_relevance_refuses_a_shop_from_an_older_generator():
    shop = generate_shop("tiny", seed=0)
    old = {k: v for k, v in shop.hidden.items() if k not in ("user_interest_vec", "item_popularity")}
    with pytest.raises(ValueError, match="older generator"):
        true_relevance(old, np.array([0]), np.array([0]))
    assert 0.0 < true_relevance(shop.hidden, np.array([0]), np.array([0]))[0] < 1.0
