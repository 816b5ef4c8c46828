"""Counterfactual replay: exact propensities, deterministic logs, and estimates that cover the simulator's truth."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from training.request.policy_config import PolicyConfig
from training.evaluation.replay import ReplayConfig, catalog_arrays, ground_truth, replay, write_impressions
from training.data.synthetic import generate_shop

# Fewer candidates and more random slates than the default: better support, so a small log covers the truth.
CFG = ReplayConfig(n_sessions=2000, candidates=20, logging_epsilon=0.5, bootstrap=200, seed=0)


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", seed=0)


@pytest.fixture(scope="module")
def result(shop):
    return replay(shop, {"diversity_off": {"brand_diversity": False}}, CFG)


def test_ground_truth_matches_the_shop_hidden_state(shop):
    truth = ground_truth(shop)
    np.testing.assert_array_equal(truth["latent"], shop.hidden["item_latent"])
    np.testing.assert_array_equal(truth["icat"], shop.hidden["user_interest_category"])


def test_in_stock_flag_is_read_from_the_catalog_attributes(shop):
    stock = catalog_arrays(shop.catalog)["in_stock"]
    assert stock.dtype == bool and 0.9 < stock.mean() < 0.99  # the generator marks ~5% out of stock


def test_replay_is_deterministic_by_seed(shop, result):
    again = replay(shop, {"diversity_off": {"brand_diversity": False}}, CFG)
    np.testing.assert_array_equal(again["log"].shown, result["log"].shown)
    assert again["policies"] == result["policies"]


def test_propensities_are_the_exact_epsilon_greedy_marginals(result):
    log, eps, n = result["log"], CFG.logging_epsilon, CFG.candidates
    assert set(np.round(np.unique(log.propensity), 9)) <= {round(eps / n, 9), round(1 - eps + eps / n, 9)}
    # The base policy's own estimate: weights average 1 per position, so SNIPS is close to IPS.
    base = result["policies"]["base"]
    assert abs(base["ctr"]["snips"] - base["ctr"]["ips"]) < 0.01


@pytest.mark.parametrize(("policy", "metric"), [("base", "ctr"), ("base", "purchase_rate"), ("diversity_off", "ctr")])
def test_estimates_cover_the_simulated_truth(result, policy, metric):
    # A change's purchase rate is left out: rare purchases times large weights make its IPS right-skewed, so a
    # 2,000-session log usually under-estimates it and the normal interval under-covers.
    p = result["policies"][policy]
    e, truth = p[metric], p["truth"][metric]
    assert e["ips_lo"] <= truth <= e["ips_hi"], (e, truth)
    assert e["snips_lo"] <= truth <= e["snips_hi"], (e, truth)


def test_a_change_that_shows_nothing_logged_gets_a_zero_estimate(shop):
    blocked = sorted(set(catalog_arrays(shop.catalog)["brand"]))
    out = replay(shop, {"block_all": {"blocked_brands": blocked}}, ReplayConfig(n_sessions=200, bootstrap=20))
    p = out["policies"]["block_all"]
    assert p["truth"]["ctr"] == 0.0 and p["ctr"]["ips"] == 0.0


def test_logged_impressions_are_written_as_parquet_with_propensities(shop, result, tmp_path):
    path = write_impressions(result, shop, tmp_path / "impressions.parquet")
    table = pq.read_table(path)
    assert table.num_rows == int((result["log"].shown >= 0).sum())
    assert {"session", "user_id", "item_id", "position", "propensity", "click", "purchase"} <= set(table.column_names)
    assert b"replay_config" in table.schema.metadata


def test_replay_reads_the_saved_truth_and_refuses_a_shop_without_it(shop):
    import dataclasses

    other = dataclasses.replace(shop, hidden={k: v for k, v in shop.hidden.items() if k != "user_interest_vec"})
    with pytest.raises(ValueError, match="user_interest_vec"):
        replay(other, {}, ReplayConfig(n_sessions=10), PolicyConfig())


def test_replay_command_writes_estimates_and_the_impression_log(tmp_path, capsys):
    import json

    from cluster.cli import main
    from training.data.schemas import write_shop

    write_shop(generate_shop("tiny", seed=0), tmp_path / "shop")
    main(["replay", "--data", str(tmp_path / "shop"), "--sessions", "300", "--out", str(tmp_path / "r.json"),
          "--impressions", str(tmp_path / "imp.parquet"), "--changes", '{"diversity_off": {"brand_diversity": false}}'])
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result["policies"]) == {"base", "diversity_off"}
    assert "diversity_off" in capsys.readouterr().out
    log = pq.read_table(tmp_path / "imp.parquet")
    assert {"propensity", "position", "click"} <= set(log.column_names) and len(log) > 0


def test_replay_command_names_a_bad_policy_change(tmp_path, capsys):
    from cluster.cli import main
    from training.data.schemas import write_shop

    write_shop(generate_shop("tiny", seed=0), tmp_path / "shop")
    with pytest.raises(SystemExit) as exit_info:
        main(["replay", "--data", str(tmp_path / "shop"), "--changes", '{"x": {"max_brand_run": 0}}'])
    assert exit_info.value.code == 2 and "max_brand_run" in capsys.readouterr().err
