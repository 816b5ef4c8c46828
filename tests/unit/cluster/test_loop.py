"""The closed loop's data and offline steps (cluster/loop.py), without Ray: the loop shop, its held-out period, and
the offline comparison of versions on it."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from cluster.loop import held_out_fraction, loop_shop, offline_on
from tests.unit.tiny_bundle import write_tiny_bundle
from training.data.examples import temporal_split
from training.data.schemas import read_shop, write_shop
from training.fit.bundle import load_bundle, write_bundle

HOUR_MS = 3_600_000


def served_after(shop, n: int = 3000, gap_ms: int = HOUR_MS) -> pa.Table:
    """The shop's last n events moved to start `gap_ms` after its end, each on a random item: a served period of the
    same shape, with engagements new to their users."""
    tail = shop.events.slice(shop.events.num_rows - n)
    items = np.random.default_rng(0).choice(shop.catalog["item_id"].to_numpy(zero_copy_only=False), n)
    tail = tail.set_column(tail.schema.get_field_index("item_id"), "item_id", pa.array(items))
    t = tail["timestamp"].cast(pa.int64()).to_numpy()
    end = int(pc.max(shop.events["timestamp"].cast(pa.int64())).as_py())
    moved = pa.array(t - t.min() + end + gap_ms).cast(tail.schema.field("timestamp").type)
    return tail.set_column(tail.schema.get_field_index("timestamp"), "timestamp", moved)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    shop, bundle = write_tiny_bundle(tmp_path_factory.mktemp("loop-bundle"))
    shop_dir = tmp_path_factory.mktemp("loop-shop")
    write_shop(shop, shop_dir)
    return shop, shop_dir, bundle


def test_the_loop_shop_is_the_shop_followed_by_its_served_period(tiny, tmp_path):
    shop, shop_dir, _ = tiny
    served = served_after(shop)
    out = read_shop(loop_shop(shop_dir, served, tmp_path / "loop"))
    assert out.events.num_rows == shop.events.num_rows + served.num_rows
    assert out.catalog.equals(shop.catalog) and out.users.equals(shop.users)
    assert out.meta["served_events"] == served.num_rows and out.meta["served_from"] > shop.meta["end_time"]
    assert out.meta["end_time"] > out.meta["served_from"] and out.meta["loop_of"]
    assert set(out.hidden) == set(shop.hidden)


def test_served_events_that_do_not_follow_the_shop_or_are_none_are_refused(tiny, tmp_path):
    shop, shop_dir, _ = tiny
    with pytest.raises(ValueError, match="not after the shop's end"):
        loop_shop(shop_dir, served_after(shop, gap_ms=-HOUR_MS), tmp_path / "a")
    with pytest.raises(ValueError, match="no events"):
        loop_shop(shop_dir, shop.events.slice(0, 0), tmp_path / "b")


def test_the_held_out_fraction_splits_the_served_period_at_its_share(tiny, tmp_path):
    shop, shop_dir, _ = tiny
    served = served_after(shop)
    out = read_shop(loop_shop(shop_dir, served, tmp_path / "loop"))
    split = temporal_split(out.events, held_out_fraction(out.events.num_rows, served.num_rows, 0.5))
    first_served = int(pc.min(served["timestamp"].cast(pa.int64())).as_py())
    assert split.cutoff_ms > first_served  # the training side keeps the first part of the served period
    assert split.test.num_rows == pytest.approx(served.num_rows / 2, rel=0.02)
    with pytest.raises(ValueError):
        held_out_fraction(10, 0)


def test_versions_are_compared_offline_on_the_same_held_out_users_in_the_order_they_serve(tiny, tmp_path):
    shop, shop_dir, bundle = tiny
    served = served_after(shop)
    out = read_shop(loop_shop(shop_dir, served, tmp_path / "loop"))
    frac = held_out_fraction(out.events.num_rows, served.num_rows)
    a = offline_on(bundle, out, frac, max_users=200, seed=0)
    b = offline_on(bundle, out, frac, max_users=200, seed=0)
    assert a == b and 0 < a["users"] <= 200 and a["serves"] == "ranker"  # the tiny bundle records no order
    assert a["final_ndcg@10"] == a["ranker_ndcg@10"] and a["final_true_relevance@10"] == a["ranker_true_relevance@10"]
    for key in ("ranker_ndcg@10", "retrieval_ndcg@10", "ranker_true_relevance@10", "retrieval_true_relevance@10"):
        assert 0.0 <= a[key] <= 1.0, key
    assert 0.0 <= a["retrieval"]["recall@10"] <= a["retrieval"]["recall@100"] <= 1.0


def test_a_multi_interest_version_is_compared_by_its_merged_queries_and_other_models_are_refused(tiny, tmp_path):
    from training.models.multi_interest import MultiInterestConfig, MultiInterestModel

    shop, shop_dir, bundle = tiny
    b = load_bundle(bundle)
    sizes = {k: v for k, v in b.space.sizes.items() if k in MultiInterestConfig.__dataclass_fields__}
    torch.manual_seed(0)
    multi = write_bundle(tmp_path, "v8", b.space, b.items, MultiInterestModel(MultiInterestConfig(**sizes, dim=16)),
                         b.ranker(), {}, "snap", {}, {"model": "multi_interest", "conditions": {"max_followed": 2}})
    served = served_after(shop)
    out = read_shop(loop_shop(shop_dir, served, tmp_path / "loop"))
    frac = held_out_fraction(out.events.num_rows, served.num_rows)
    a = offline_on(multi, out, frac, max_users=100, seed=0)
    assert 0 < a["users"] <= 100 and a["version"] == "v8"
    assert 0.0 <= a["retrieval"]["recall@10"] <= a["retrieval"]["recall@100"] <= 1.0
    other = write_bundle(tmp_path, "v9", b.space, b.items, b.two_tower(), b.ranker(), {}, "snap", {},
                         {"model": "sasrec"})
    with pytest.raises(ValueError, match="sasrec"):
        offline_on(other, shop, 0.1, max_users=10, seed=0)


def test_figures_over_seeds_pair_the_versions_seed_by_seed():
    from cluster.loop import over_seeds

    def report(seed, ndcg1, ndcg2, clicks1, clicks2):
        off = {v: {"final_ndcg@10": n, "ranker_ndcg@10": n, "retrieval_ndcg@10": 0.1, "final_true_relevance@10": 0.2,
                   "ranker_true_relevance@10": 0.2, "retrieval_true_relevance@10": 0.1,
                   "retrieval": {"recall@100": 0.5}} for v, n in (("v1", ndcg1), ("v2", ndcg2))}
        on = {v: {"clicks_per_session": {"mean": c}, "purchases_per_session": {"mean": 0.01}}
              for v, c in (("v1", clicks1), ("v2", clicks2))}
        return {"seed": seed, "offline": off, "round2": {"by_version": on}}

    s = over_seeds([report(1, 0.10, 0.12, 0.5, 0.7), report(2, 0.20, 0.18, 0.6, 0.9)])
    assert s["seeds"] == [1, 2]
    assert s["versions"]["v1"]["final ndcg@10"]["mean"] == pytest.approx(0.15)
    assert s["versions"]["v1"]["final ndcg@10"]["std"] == pytest.approx(0.05)
    d = s["v2_minus_v1"]["final ndcg@10"]
    assert d["per_seed"] == pytest.approx([0.02, -0.02]) and d["positive_seeds"] == 1
    assert s["v2_minus_v1"]["clicks/session"]["mean"] == pytest.approx(0.25)
    assert s["v2_minus_v1"]["clicks/session"]["positive_seeds"] == 2
    assert "paired" not in s  # reports from before the paired round

    def with_pair(r, lo, mean, hi):
        iv = {"mean": mean, "lo": lo, "hi": hi}
        return r | {"paired": {"difference": {"clicks_per_session": iv, "purchases_per_session": iv}}}

    s = over_seeds([with_pair(report(1, 0.1, 0.1, 0.5, 0.5), 0.01, 0.05, 0.09),
                    with_pair(report(2, 0.1, 0.1, 0.5, 0.5), -0.03, 0.01, 0.05)])
    assert s["paired"]["clicks_per_session"] == {"per_seed": [0.05, 0.01], "interval_above_zero": 1,
                                                 "interval_below_zero": 0}


def test_a_finished_loop_is_reused_only_for_the_same_settings_shuffle_included(tmp_path):
    import dataclasses
    import json

    from cluster.config import RecsysConfig
    from cluster.loop import finished_loop

    cfg = RecsysConfig()
    report = {"shop": cfg.data.dir, "sessions": 100, "seed": 1, "k": 12, "ranker_views": "served", "shuffle": 0.3}
    (tmp_path / "loop.json").write_text(json.dumps(report))
    assert finished_loop(tmp_path, cfg, 100, 1, shuffle=0.3) == report
    assert finished_loop(tmp_path, cfg, 100, 1) is None  # a loop without the shuffle is another loop
    assert finished_loop(tmp_path, cfg, 100, 2, shuffle=0.3) is None
    multi = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, retrieval_model="multi_interest"))
    assert finished_loop(tmp_path, multi, 100, 1, shuffle=0.3) is None  # a loop of another retrieval model


def test_a_loop_of_another_retrieval_model_than_the_demos_v1_trains_a_v1_of_its_own(tiny, tmp_path):
    import dataclasses
    import json

    from cluster.config import load_config
    from cluster.demo import bundles_root, version_train_config
    from cluster.loop import _v1_path

    _, shop_dir, _ = tiny
    cfg = load_config("loop")
    cfg = dataclasses.replace(cfg, demo=dataclasses.replace(cfg.demo, bundles_dir=str(tmp_path)))
    two_tower = version_train_config(cfg, "v1", 0)
    multi = dataclasses.replace(two_tower, retrieval_model="multi_interest")
    demo_v1 = bundles_root(cfg, shop_dir) / "v1"
    assert _v1_path(cfg, shop_dir, two_tower) == demo_v1  # the demo's v1, trained or not yet
    own = _v1_path(cfg, shop_dir, multi)
    assert own != demo_v1 and own.name == "v1" and own == _v1_path(cfg, shop_dir, multi)
    demo_v1.mkdir(parents=True)
    (demo_v1 / "manifest.json").write_text(json.dumps({"metrics": {"retrieval_model": "multi_interest"}}))
    assert _v1_path(cfg, shop_dir, two_tower) != demo_v1  # a v1 of another model is there: never reused


def test_the_served_log_is_the_rounds_requests_and_a_log_that_never_came_is_an_error(tmp_path):
    import asyncio

    from cluster.loop import served_log
    from deployments.ingress.impressions import ImpressionLog, ParquetSink, answer_rows
    from training.request.contracts import RankedList

    final = RankedList(item_ids=["a", "b"], scores=np.array([1.0, 0.5]), brands=["x", "y"], categories=["c", "c"],
                       reasons=["condition:category=c", "interest:0"], propensity=[1.0, 1.0])

    async def log_answers():
        log = ImpressionLog(ParquetSink(tmp_path / "imp"), flush_s=3600)
        for request_id in ("loop1-1-0", "loop1-1-1", "other-0"):
            log.record(answer_rows(request_id, "u1", "v1", "home", final, 2, 1_790_000_000.0))
        await log.close()

    asyncio.run(log_answers())
    logged = served_log(str(tmp_path / "imp"), "loop1-1-", answers=2, timeout_s=0)
    assert sorted(set(logged["request_id"].to_pylist())) == ["loop1-1-0", "loop1-1-1"] and logged.num_rows == 4
    with pytest.raises(FileNotFoundError, match="no impression log"):
        served_log(str(tmp_path / "never"), "loop1-1-", answers=1, timeout_s=0)


def test_v2_trains_on_the_whole_served_period_for_the_epochs_v1s_validation_chose(tmp_path):
    import json

    from cluster.loop import v2_schedule

    v1 = tmp_path / "v1"
    v1.mkdir()
    manifest = {"metrics": {"training": {"retrieval_validation": {"best_epoch": 6, "epochs_run": 9}}}}
    (v1 / "manifest.json").write_text(json.dumps(manifest))
    assert v2_schedule(v1) == {"val_users": 0, "tower_epochs": 6}
    (v1 / "manifest.json").write_text(json.dumps({"metrics": {"training": {"retrieval_validation": None}}}))
    assert v2_schedule(v1) == {"val_users": 0}  # v1 was not validated: v2 keeps the epoch budget
