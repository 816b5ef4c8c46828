"""Offline rule effects: each rule moves its own figure in the expected direction, and the table has every row."""
from __future__ import annotations

import numpy as np
import pytest

from training.request.contracts import UserState
from training.request.policy_config import PolicyConfig
from training.evaluation.policy import rule_effects, shop_rule_effects

NOW = 1_000_000.0


def toy():
    """One user, 6 items: brands a a a b b c, item 5 new, item 1 bought; target items 0 and 5."""
    catalog = {"item_id": [f"i{j}" for j in range(6)], "brand": list("aaabbc"), "category": list("xxyyzz"),
               "created_at": np.array([0, 0, 0, 0, 0, NOW]), "in_stock": np.ones(6, bool)}
    ranked, scores = np.arange(6)[None, :], np.linspace(1, 0, 6)[None, :]
    users = [UserState({"i1": NOW - 86_400.0}, NOW)]
    return ranked, scores, catalog, users, [np.array([0, 5])]


def test_rules_move_their_figures_and_the_table_names_each_rule():
    ranked, scores, catalog, users, targets = toy()
    config = PolicyConfig(explore_epsilon=1.0, explore_slots=(1,), surfaces={})
    table = rule_effects(ranked, scores, catalog, users, targets, config, k=4)
    assert set(table) == {"no_policy", "all_rules", "without:bought_down_sort", "without:explore",
                          "without:brand_diversity", "without:filter"}
    assert table["no_policy"]["longest_brand_run@4"] == 3 and table["all_rules"]["longest_brand_run@4"] == 1
    assert table["no_policy"]["repeat_purchase_share@4"] == 0.25 and table["all_rules"]["repeat_purchase_share@4"] == 0
    assert table["all_rules"]["novelty@4"] == 0.25 and table["without:explore"]["novelty@4"] == 0.0
    assert table["all_rules"]["unique_brands@4"] > table["no_policy"]["unique_brands@4"]
    assert table["all_rules"]["ndcg@4"] > table["without:explore"]["ndcg@4"]  # the explored item is a target


def test_mismatched_inputs_are_refused():
    ranked, scores, catalog, users, targets = toy()
    with pytest.raises(ValueError, match="agree"):
        rule_effects(ranked, scores[:, :3], catalog, users, targets)


def test_on_the_tiny_shop_diversity_rises_and_repeat_purchases_fall():
    from training.data.synthetic import generate_shop

    table = shop_rule_effects(generate_shop("tiny", 0), PolicyConfig(bought_window_days=365.0), n_users=150)
    assert table["all_rules"]["unique_brands@10"] > table["no_policy"]["unique_brands@10"]
    assert table["all_rules"]["longest_brand_run@10"] < table["no_policy"]["longest_brand_run@10"]
    assert table["all_rules"]["repeat_purchase_share@10"] <= table["no_policy"]["repeat_purchase_share@10"]
