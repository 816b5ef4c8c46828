"""Policy rules: the policy keeps every item, brand runs stay short whenever possible, recent purchases sink."""

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.policy import (
    PolicyConfig,
    RankedList,
    UserState,
    apply_policy,
    diversify_brands,
    down_sort_bought,
    longest_brand_run,
)

DAY = 86_400.0
NOW = 1_700_000_000.0


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
    out = diversify_brands(make_list(brands), PolicyConfig(max_brand_run=max_run))
    assert (longest_brand_run(out.brands) <= max_run) == feasible_brute_force(brands, max_run)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=20), st.integers(min_value=0, max_value=20))
def test_max_run_one_is_feasible_iff_no_brand_exceeds_half_rounded_up(n_major: int, n_other: int) -> None:
    brands = ["a"] * n_major + [f"b{j % 3}" for j in range(n_other)]
    out = diversify_brands(make_list(brands), PolicyConfig(max_brand_run=1))
    largest = max(brands.count(b) for b in set(brands))
    assert (longest_brand_run(out.brands) <= 1) == (largest <= (len(brands) + 1) // 2)


def test_diversify_moves_items_least_and_marks_only_those_pushed_down() -> None:
    out = diversify_brands(make_list(list("aabc")), PolicyConfig(max_brand_run=1))
    assert out.brands == list("abac")
    assert out.item_ids == ["i0", "i2", "i1", "i3"]
    assert out.reasons == ["retrieval", "retrieval", "policy:brand_diversity", "retrieval"]


def test_diversify_looks_ahead_so_the_tail_can_still_alternate() -> None:
    # Plain greedy would give a, b, b; taking b first is the only arrangement without a run.
    out = diversify_brands(make_list(list("abb")), PolicyConfig(max_brand_run=1))
    assert out.brands == list("bab")
    assert out.reasons == ["retrieval", "policy:brand_diversity", "retrieval"]


def test_diversify_keeps_order_when_only_one_brand_remains() -> None:
    ranked = make_list(list("aaaa"))
    out = diversify_brands(ranked, PolicyConfig(max_brand_run=1))
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
