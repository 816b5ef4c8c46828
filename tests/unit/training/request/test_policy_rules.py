"""Policy rules: the policy keeps every unfiltered item, brand runs stay short whenever possible, recent purchases
sink, pinned slots hold, quotas hold, exploration is reproducible per request."""

from collections import Counter
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.request.contracts import RankedList, UserState
from training.request.policy_config import PolicyConfig
from training.request.policy import (
    apply_policy,
    apply_quotas,
    diversify_brands,
    down_sort_bought,
    explore_new_items,
    filter_items,
    longest_brand_run,
    place_sponsored,
    policy_rng,
    request_rng,
    shuffle_marginal,
)

DAY = 86_400.0
NOW = 1_700_000_000.0
NOBODY = UserState(bought_at={}, now=NOW)


def make_list(brands: list[str]) -> RankedList:
    n = len(brands)
    return RankedList(
        item_ids=[f"i{j}" for j in range(n)],
        scores=np.linspace(1.0, 0.0, n, dtype=np.float32),
        brands=list(brands),
        categories=[f"c{j % 3}" for j in range(n)],
        reasons=["retrieval"] * n,
    )


def feasible_brute_force(brands: list[str], max_run: int) -> bool:
    """Exhaustive search over arrangements of the brand multiset (memoised on counts, last brand and run)."""
    names = sorted(set(brands))

    @lru_cache(maxsize=None)
    def ok(counts: tuple[int, ...], last: int, run: int) -> bool:
        if sum(counts) == 0:
            return True
        for j, c in enumerate(counts):
            new_run = run + 1 if j == last else 1
            if c and new_run <= max_run:
                if ok(counts[:j] + (c - 1,) + counts[j + 1 :], j, new_run):
                    return True
        return False

    return ok(tuple(brands.count(b) for b in names), -1, 0)


brand_lists = st.lists(st.sampled_from("abcd"), max_size=14)
max_runs = st.integers(min_value=1, max_value=3)


@st.composite
def requests(draw: st.DrawFn) -> tuple[RankedList, UserState]:
    ranked = make_list(draw(brand_lists))
    bought: dict[str, float] = {}
    for item in ranked.item_ids:
        age_days = draw(st.none() | st.floats(min_value=0.0, max_value=200.0))
        if age_days is not None:
            bought[item] = NOW - age_days * DAY
    return ranked, UserState(bought_at=bought, now=NOW)


def recent_items(user: UserState, window_days: float) -> set[str]:
    return {i for i, t in user.bought_at.items() if t >= NOW - window_days * DAY}


@settings(max_examples=300, deadline=None)
@given(requests(), max_runs, st.booleans(), st.booleans())
def test_apply_policy_keeps_every_item_with_its_attributes(
    req: tuple[RankedList, UserState], max_run: int, diversity: bool, down_sort: bool
) -> None:
    ranked, user = req
    config = PolicyConfig(brand_diversity=diversity, max_brand_run=max_run, bought_down_sort=down_sort)
    out = apply_policy(ranked, user, config, rng=np.random.default_rng(0))
    assert sorted(out.item_ids) == sorted(ranked.item_ids)
    before = {i: (b, c, s) for i, b, c, s in zip(ranked.item_ids, ranked.brands, ranked.categories, ranked.scores)}
    assert all(before[i] == (b, c, s) for i, b, c, s in zip(out.item_ids, out.brands, out.categories, out.scores))


@settings(max_examples=400, deadline=None)
@given(brand_lists, max_runs)
def test_no_brand_run_exceeds_limit_exactly_when_some_arrangement_allows_it(brands: list[str], max_run: int) -> None:
    out = diversify_brands(make_list(brands), NOBODY, PolicyConfig(max_brand_run=max_run))
    assert (longest_brand_run(out.brands) <= max_run) == feasible_brute_force(brands, max_run)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=20))
def test_max_run_one_is_feasible_iff_no_brand_exceeds_half_rounded_up(n_major: int, n_other: int) -> None:
    brands = ["a"] * n_major + [f"b{j % 3}" for j in range(n_other)]
    out = diversify_brands(make_list(brands), NOBODY, PolicyConfig(max_brand_run=1))
    largest = max(brands.count(b) for b in set(brands))
    assert (longest_brand_run(out.brands) <= 1) == (largest <= (len(brands) + 1) // 2)


def test_diversify_moves_items_least_and_marks_only_those_pushed_down() -> None:
    out = diversify_brands(make_list(list("aabc")), NOBODY, PolicyConfig(max_brand_run=1))
    assert out.brands == list("abac")
    assert out.item_ids == ["i0", "i2", "i1", "i3"]
    assert out.reasons == ["retrieval", "retrieval", "policy:brand_diversity", "retrieval"]


def test_diversify_looks_ahead_so_the_tail_can_still_alternate() -> None:
    # Plain greedy would give a, b, b; taking b first is the only arrangement without a run.
    out = diversify_brands(make_list(list("abb")), NOBODY, PolicyConfig(max_brand_run=1))
    assert out.brands == list("bab")
    assert out.reasons == ["retrieval", "policy:brand_diversity", "retrieval"]


def test_diversify_keeps_order_when_only_one_brand_remains() -> None:
    ranked = make_list(list("aaaa"))
    out = diversify_brands(ranked, NOBODY, PolicyConfig(max_brand_run=1))
    assert out.item_ids == ranked.item_ids
    assert out.reasons == ranked.reasons


@settings(max_examples=300, deadline=None)
@given(requests(), max_runs, st.floats(min_value=0.0, max_value=120.0), st.booleans())
def test_recently_bought_items_end_below_all_others(
    req: tuple[RankedList, UserState], max_run: int, window: float, diversity: bool
) -> None:
    ranked, user = req
    config = PolicyConfig(brand_diversity=diversity, max_brand_run=max_run, bought_window_days=window)
    recent = recent_items(user, window)
    out = apply_policy(ranked, user, config)
    flags = [i in recent for i in out.item_ids]
    assert flags == sorted(flags)  # all False (not recent) before all True
    if not diversity:  # down-sort alone is a stable partition: old purchases keep their place among the rest
        stable = [i for i in ranked.item_ids if i not in recent] + [i for i in ranked.item_ids if i in recent]
        assert out.item_ids == stable


def test_down_sort_marks_moved_items_and_ignores_old_purchases() -> None:
    ranked = make_list(list("abcd"))
    user = UserState(bought_at={"i0": NOW - 10 * DAY, "i1": NOW - 90 * DAY, "i3": NOW - 1 * DAY}, now=NOW)
    out = down_sort_bought(ranked, user, PolicyConfig(bought_window_days=60.0))
    assert out.item_ids == ["i1", "i2", "i0", "i3"]
    # i3 was already last, so it did not move and keeps its reason.
    assert out.reasons == ["retrieval", "retrieval", "policy:bought_down_sort", "retrieval"]


@settings(max_examples=200, deadline=None)
@given(brand_lists, max_runs)
def test_order_is_unchanged_when_no_rule_applies(brands: list[str], max_run: int) -> None:
    ranked = make_list(brands)
    user = UserState(bought_at={"i0": NOW - 400 * DAY, "elsewhere": NOW}, now=NOW)
    out = apply_policy(ranked, user, PolicyConfig(max_brand_run=max_run))
    if longest_brand_run(brands) <= max_run:
        assert out.item_ids == ranked.item_ids
        assert out.reasons == ranked.reasons


def test_disabled_rules_do_nothing() -> None:
    ranked = make_list(list("aab"))
    user = UserState(bought_at={"i0": NOW}, now=NOW)
    out = apply_policy(ranked, user, PolicyConfig(brand_diversity=False, bought_down_sort=False))
    assert out.item_ids == ranked.item_ids


def test_longest_brand_run_counts_consecutive_equal_brands() -> None:
    assert longest_brand_run([]) == 0
    assert longest_brand_run(list("abbbcaa")) == 3


def test_config_round_trips_through_dict() -> None:
    config = PolicyConfig(max_brand_run=2, bought_window_days=7)
    assert PolicyConfig.from_dict(config.to_dict()) == config
    assert PolicyConfig.from_dict(None) == PolicyConfig()
    assert PolicyConfig().with_overrides({"max_brand_run": 3}).max_brand_run == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"max_brand_runs": 2}, "max_brand_runs"),
        ({"max_brand_run": 0}, "max_brand_run"),
        ({"max_brand_run": 1.5}, "max_brand_run"),
        ({"max_brand_run": True}, "max_brand_run"),
        ({"bought_window_days": -1.0}, "bought_window_days"),
        ({"bought_window_days": "60"}, "bought_window_days"),
        ({"brand_diversity": "yes"}, "brand_diversity"),
    ],
)
def test_invalid_overrides_raise_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PolicyConfig().with_overrides(overrides)
    with pytest.raises(ValueError, match=field):
        PolicyConfig.from_dict(overrides)


def test_ranked_list_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="brands"):
        RankedList(item_ids=["a", "b"], scores=np.zeros(2), brands=["x"], categories=["c", "c"], reasons=["r", "r"])


def test_brand_diversity_continues_across_the_bought_boundary_without_lifting_bought_items() -> None:
    ranked = make_list(list("aabab"))  # i3 (a) and i4 (b) were bought recently
    user = UserState(bought_at={"i3": NOW - DAY, "i4": NOW - DAY}, now=NOW)
    out = apply_policy(ranked, user, PolicyConfig(max_brand_run=1))
    # Not bought: a, b, a; the bought group starts with b so the run does not continue across the boundary.
    assert out.item_ids == ["i0", "i2", "i1", "i4", "i3"]
    assert out.brands == list("ababa")


# --- filters, exploration, sponsored slots, quotas, presets -------------------------------------------------------

def shop_list(brands: str, new: str = "", out_of_stock: str = "", cats: str | None = None) -> RankedList:
    """A list with one char per item: brands, categories (default c0/c1/c2 cycling), new and out-of-stock items
    given as sets of positions in hex digits ("03" = items 0 and 3)."""
    ranked = make_list(list(brands))
    n = len(brands)
    new_at = {int(ch, 16) for ch in new}
    ranked.created_at = np.array([NOW - (DAY if j in new_at else 300 * DAY) for j in range(n)])
    ranked.in_stock = np.array([f"{j:x}" not in out_of_stock for j in range(n)])
    if cats is not None:
        ranked.categories = list(cats)
    return ranked


def test_filters_drop_blocked_brands_categories_and_out_of_stock_items_only() -> None:
    ranked = shop_list("abcdab", out_of_stock="1")
    out = filter_items(ranked, NOBODY, PolicyConfig(blocked_brands=("c",), blocked_categories=("c2",)))
    # i1 out of stock, i2 brand c, i2 and i5 category c2 (j % 3 == 2)
    assert out.item_ids == ["i0", "i3", "i4"]
    assert filter_items(ranked, NOBODY, PolicyConfig(filter_out_of_stock=False)).item_ids == ranked.item_ids


def test_exploration_is_reproducible_per_request_and_promotes_only_new_items_below_the_slot() -> None:
    ranked = shop_list("abcdefghijkl", new="59ab")
    config = PolicyConfig(explore_epsilon=1.0, explore_slots=(2, 6))
    a = explore_new_items(ranked, NOBODY, config, request_rng("req-1"))
    assert a.item_ids == explore_new_items(ranked, NOBODY, config, request_rng("req-1")).item_ids
    explored = [j for j, r in enumerate(a.reasons) if r == "policy:explore"]
    assert explored == [2, 6]
    assert all(int(a.item_ids[j][1:]) in {5, 9, 10, 11} for j in explored)
    draws = {tuple(explore_new_items(ranked, NOBODY, config, request_rng(f"r{s}")).item_ids) for s in range(30)}
    assert len(draws) > 3  # different requests explore different items
    assert explore_new_items(ranked, NOBODY, PolicyConfig(), request_rng("x")).item_ids == ranked.item_ids


def test_exploration_at_epsilon_point_three_fills_about_that_share_of_slots() -> None:
    ranked = shop_list("abcdefghijkl", new="9ab")
    config = PolicyConfig(explore_epsilon=0.3, explore_slots=(4,))
    hits = sum(explore_new_items(ranked, NOBODY, config, request_rng(f"r{s}")).reasons[4] == "policy:explore"
               for s in range(2000))
    assert 0.26 < hits / 2000 < 0.34


def test_propensities_match_how_often_the_policy_places_each_item_there() -> None:
    """Exploration at slot 4 from a pool of 3 new items at epsilon 0.3: the explored item had 0.3 / 3, the items
    above the slot 1, those below it 0.7; over 3,000 requests the frequencies agree."""
    ranked = shop_list("abcdefghijkl", new="9ab")
    config = PolicyConfig(explore_epsilon=0.3, explore_slots=(4,))
    lists = [apply_policy(ranked, NOBODY, config, request_rng(f"r{s}")) for s in range(3000)]
    one = next(out for out in lists if out.reasons[4] == "policy:explore")
    assert one.propensity[4] == pytest.approx(0.1) and list(one.propensity[:4]) == [1.0] * 4
    calm = next(out for out in lists if out.reasons[4] != "policy:explore")
    assert calm.propensity[5] == pytest.approx(0.7)
    seen = Counter((out.item_ids[4], out.reasons[4]) for out in lists)
    for (item, reason), n in seen.items():
        want = next(out.propensity[4] for out in lists if (out.item_ids[4], out.reasons[4]) == (item, reason))
        assert abs(n / len(lists) - want) < 0.03, (item, reason)
    assert (apply_policy(ranked, NOBODY, PolicyConfig(), None).propensity == 1.0).all()  # nothing random


def test_the_logging_shuffle_puts_every_top_item_at_every_top_slot_with_its_logged_propensity() -> None:
    """Shuffle at epsilon 0.4 over the top 4 of 8 items, after exploration at slot 2: over 4,000 requests, each
    (item, slot) of the top 4 turns up as often as `shuffle_marginal` of the request's unshuffled list says, the
    answer's own propensity is that times exploration's, and the items below the top 4 never move."""
    ranked = shop_list("abcdefgh", new="67")
    explore = PolicyConfig(explore_epsilon=0.5, explore_slots=(2,), brand_diversity=False)
    config = explore.with_overrides({"shuffle_epsilon": 0.4, "shuffle_top": 4})
    seen: Counter = Counter()
    want: Counter = Counter()
    for s in range(4000):
        base = apply_policy(ranked, NOBODY, explore, policy_rng(config, f"r{s}"))  # the same draws, unshuffled
        out = apply_policy(ranked, NOBODY, config, policy_rng(config, f"r{s}"))
        assert out.item_ids[4:] == base.item_ids[4:] and sorted(out.item_ids[:4]) == sorted(base.item_ids[:4])
        marginal = shuffle_marginal(base.item_ids, out.item_ids, config)
        assert out.propensity[:4] == pytest.approx([(0.6 * base.propensity[k] if out.item_ids[k] == base.item_ids[k]
                                                     else 0.0) + 0.1 for k in range(4)])
        assert marginal.min() >= 0.1 and (marginal[4:] == 1.0).all()
        moved = [k for k in range(4) if out.item_ids[k] != base.item_ids[k]]
        assert all(out.reasons[k] == "policy:shuffle" for k in moved)
        seen.update((out.item_ids[k], k) for k in range(4))
        for k in range(4):  # the expected count of every (item, slot) given this request's unshuffled list
            for item in base.item_ids[:4]:
                want[(item, k)] += 0.6 * (base.item_ids[k] == item) + 0.1
    for key, n in want.items():
        assert abs(seen[key] - n) / 4000 < 0.025, key
    assert policy_rng(PolicyConfig(), "r1") is None and policy_rng(config, "r1") is not None


def test_shuffle_marginal_is_zero_for_an_item_outside_the_shuffled_top() -> None:
    config = PolicyConfig(shuffle_epsilon=0.5, shuffle_top=2)
    assert list(shuffle_marginal(["a", "b", "c"], ["b", "c", "a"], config)) == [0.25, 0.0, 0.0]
    assert list(shuffle_marginal(["a", "b", "c"], ["a", "b", "c"], PolicyConfig())) == [1.0, 1.0, 1.0]


def test_exploration_and_sponsored_never_lift_a_recently_bought_item() -> None:
    ranked = shop_list("abcdef", new="45")
    user = UserState(bought_at={"i4": NOW - DAY, "i5": NOW - DAY}, now=NOW)
    config = PolicyConfig(explore_epsilon=1.0, explore_slots=(1,), sponsored_items=("i4",), sponsored_slots=(0,))
    out = apply_policy(ranked, user, config, request_rng("r"))
    assert out.item_ids[-2:] == ["i4", "i5"] and "policy:explore" not in out.reasons


def test_sponsored_items_take_fixed_slots_with_cap_and_spacing() -> None:
    ranked = shop_list("abcdefghijkl")
    config = PolicyConfig(sponsored_items=("i9", "i10", "i11", "i1"), sponsored_slots=(0, 2, 5, 8),
                          sponsored_max=2, sponsored_min_spacing=3)
    out = place_sponsored(ranked, NOBODY, config)
    # slot 0: best listed item below it is i1; slot 2 is too close; slot 5: i9. The cap stops there.
    assert out.item_ids[0] == "i1" and out.item_ids[5] == "i9"
    assert [j for j, r in enumerate(out.reasons) if r == "policy:sponsored"] == [0, 5]
    assert sorted(out.item_ids) == sorted(ranked.item_ids)


def test_a_sponsored_item_already_above_its_slot_stays_there() -> None:
    out = place_sponsored(shop_list("abcdef"), NOBODY, PolicyConfig(sponsored_items=("i0",), sponsored_slots=(3,)))
    assert out.item_ids[0] == "i0" and "policy:sponsored" not in out.reasons


def test_category_cap_and_novelty_bounds_hold_in_the_top_k() -> None:
    ranked = shop_list("abcdefghijkl", new="0123", cats="xxxxxxyyyzzz")
    capped = apply_quotas(ranked, NOBODY, PolicyConfig(quota_k=6, max_per_category=2))
    assert Counter(capped.categories[:6]) == {"x": 2, "y": 2, "z": 2}
    assert capped.reasons[capped.item_ids.index("i2")] == "policy:category_quota"
    few_new = apply_quotas(ranked, NOBODY, PolicyConfig(quota_k=6, max_new=1))
    assert sum(i in {"i0", "i1", "i2", "i3"} for i in few_new.item_ids[:6]) == 1
    ranked = shop_list("abcdefghijkl", new="ab")
    more_new = apply_quotas(ranked, NOBODY, PolicyConfig(quota_k=5, min_new=2))
    assert more_new.item_ids[:5] == ["i0", "i1", "i2", "i10", "i11"]  # i3, i4 gave way, the rest kept order
    assert more_new.reasons[3:5] == ["policy:novelty_quota"] * 2
    assert more_new.reasons[5:7] == ["policy:novelty_quota"] * 2 and more_new.item_ids[5:7] == ["i3", "i4"]


full_configs = st.builds(
    PolicyConfig,
    max_brand_run=max_runs,
    explore_epsilon=st.sampled_from([0.0, 0.5, 1.0]),
    explore_slots=st.sampled_from([(), (1,), (2, 5)]),
    sponsored_items=st.sampled_from([(), ("i3", "i7", "i9")]),
    sponsored_slots=st.sampled_from([(0,), (1, 4)]),
    quota_k=st.integers(min_value=1, max_value=8),
    max_per_category=st.none() | st.integers(min_value=1, max_value=3),
    blocked_brands=st.sampled_from([(), ("d",)]),
    surfaces=st.just({}),
)


@settings(max_examples=300, deadline=None)
@given(requests(), full_configs, st.text(max_size=4))
def test_full_policy_keeps_unfiltered_items_pins_its_slots_and_sinks_bought_items(
    req: tuple[RankedList, UserState], config: PolicyConfig, request_id: str
) -> None:
    ranked, user = req
    n = len(ranked)
    ranked.created_at = np.array([NOW - (j % 3) * 5 * DAY for j in range(n)])  # every third item is old
    out = apply_policy(ranked, user, config, request_rng(request_id))
    assert sorted(out.item_ids) == sorted(i for i, b in zip(ranked.item_ids, ranked.brands)
                                          if b not in config.blocked_brands)
    recent = recent_items(user, config.bought_window_days)
    flags = [i in recent for i in out.item_ids]
    assert flags == sorted(flags)
    assert all(r == "retrieval" or r.startswith("policy:") for r in out.reasons)
    pinned = [j for j, r in enumerate(out.reasons) if r in ("policy:explore", "policy:sponsored")]
    assert set(pinned) <= set(config.explore_slots) | set(config.sponsored_slots)
    cap = config.max_per_category
    fresh_cats = Counter(c for i, c in zip(out.item_ids, out.categories) if i not in recent)
    if not pinned and cap is not None and sum(min(n, cap) for n in fresh_cats.values()) >= config.quota_k:
        assert max(Counter(out.categories[:config.quota_k]).values()) <= cap  # enough items to honour the cap
    assert apply_policy(ranked, user, config, request_rng(request_id)).item_ids == out.item_ids


def test_presets_follow_the_page_and_requests_override_them() -> None:
    base = PolicyConfig()
    assert base.for_page("home").explore_epsilon == 0.1 and base.for_page("search").max_brand_run == 2
    assert base.for_page("landing") == base and base.for_page(None) == base
    custom = PolicyConfig.from_dict({"surfaces": {"search": {"brand_diversity": False}}})
    assert custom.for_page("search").brand_diversity is False and custom.for_page("home") == custom
    assert base.for_page("search").with_overrides({"max_brand_run": 3}).max_brand_run == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"explore_epsilon": 1.5}, "explore_epsilon"),
        ({"explore_slots": [3, 1]}, "explore_slots"),
        ({"sponsored_slots": "1,2"}, "sponsored_slots"),
        ({"sponsored_items": ["i1", 7]}, "sponsored_items"),
        ({"max_per_category": -1}, "max_per_category"),
        ({"min_new": 3, "max_new": 2}, "min_new"),
        ({"quota_k": 0}, "quota_k"),
        ({"shuffle_epsilon": 1.5}, "shuffle_epsilon"),
        ({"shuffle_top": 1}, "shuffle_top"),
        ({"surfaces": {"home": {"max_brand_run": 0}}}, "surfaces.home"),
        ({"surfaces": {"home": {"explore_epsilon": 2}}}, "explore_epsilon"),
        ({"surfaces": {"home": {"nope": 1}}}, "nope"),
        ({"surfaces": {"home": {"surfaces": {}}}}, "surfaces.home.surfaces"),
    ],
)
def test_invalid_new_fields_raise_naming_the_field(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        PolicyConfig.from_dict(overrides)


def test_config_with_every_field_round_trips_through_json() -> None:
    import json

    config = PolicyConfig(blocked_brands=("b1",), explore_epsilon=0.2, sponsored_items=("i1", "i2"), max_new=3)
    assert PolicyConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
