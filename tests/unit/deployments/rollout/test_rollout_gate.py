"""The rollout's plain-Python parts: shifting weights, the routing a rollback restores, the figures the ingress
reports, the gate's checks and the live guards."""
from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.ingress.routing import BUCKETS, Routing, bucket_of, shifted_weights
from deployments.rollout.figures import Outcomes, aggregate, percentile
from deployments.rollout.gate import RolloutConfig, evaluate_gate, offline_figures, tripped_guard
from training.metrics import overlap_at_k, rank_correlation

blue_st = st.dictionaries(st.sampled_from(["v1", "v2", "v3"]), st.integers(0, 20), min_size=1).filter(
    lambda w: sum(w.values()) > 0)
steps_st = st.lists(st.floats(1, 100), min_size=1, max_size=5, unique=True).map(sorted)


@settings(max_examples=200, deadline=None)
@given(blue_st, steps_st)
def test_a_shift_in_steps_moves_users_only_to_green_and_a_rollback_restores_every_bucket(blue, steps):
    before = Routing.make({**blue, "green": 0})
    assert "green" not in before.table  # live at weight 0: owns no users
    routing = before
    for percent in steps:
        nxt = Routing.make(shifted_weights(routing.weights, "green", percent, routing.table), routing.table)
        for a, b in zip(routing.table, nxt.table):
            assert a == b or b == "green"  # a user moves only to the candidate, never between blue versions
        assert abs(nxt.shares()["green"] - percent / 100) <= 1 / BUCKETS + 1e-9
        routing = nxt
    rolled_back = Routing.make(before.weights, before.table)
    assert rolled_back.table == before.table  # every user back on the version they had before the rollout


def test_shifting_keeps_the_blue_versions_proportions_and_refuses_bad_percentages():
    w = shifted_weights({"v1": 90, "v2": 10, "v3": 0}, "v3", 50)
    assert w == pytest.approx({"v1": 45, "v2": 5, "v3": 50})
    with pytest.raises(ValueError, match="percent"):
        shifted_weights({"v1": 1}, "v2", 120)
    with pytest.raises(ValueError, match="cannot be shifted below"):
        shifted_weights({"v1": 0, "v2": 1}, "v2", 50)


def test_routing_round_trips_and_refuses_a_bad_shadow_or_version_name():
    r = Routing.make({"v1": 70, "v2": 30}, shadow="v2", shadow_share=0.25)
    assert Routing.from_dict(r.to_dict()) == r
    assert Routing.make({"v1": 1}, shadow="v1", shadow_share=0).shadow is None
    with pytest.raises(ValueError, match="shadow.version"):
        Routing.make({"v1": 1}, shadow="v9", shadow_share=0.1)
    with pytest.raises(ValueError, match="shadow.share"):
        Routing.make({"v1": 1, "v2": 0}, shadow="v2", shadow_share=2)
    with pytest.raises(ValueError, match="version name"):
        Routing.make({"../etc": 1})
    with pytest.raises(ValueError, match="unknown keys"):
        Routing.from_dict({"versions": {"v1": 1}, "extra": 1})
    users = [f"u{i}" for i in range(200)]
    assert [r.table[bucket_of(u)] for u in users] == [Routing.from_dict(r.to_dict()).table[bucket_of(u)] for u in users]


def test_overlap_and_rank_correlation_of_two_top_k_lists():
    assert overlap_at_k(["a", "b", "c"], ["c", "b", "a"], 3) == 1.0
    assert overlap_at_k(["a", "b"], ["c", "d"], 2) == 0.0
    assert overlap_at_k([], [], 5) == 1.0
    assert rank_correlation(["a", "b", "c"], ["a", "b", "c"], 3) == 1.0
    assert rank_correlation(["a", "b", "c"], ["c", "b", "a"], 3) == -1.0
    assert rank_correlation(["a", "b", "x"], ["b", "a", "y"], 3) == -1.0  # shared a, b in swapped order
    assert rank_correlation(["a", "x"], ["a", "y"], 2) is None


def test_outcomes_report_per_version_and_aggregate_into_rates_and_percentiles():
    o = Outcomes()
    for i in range(100):
        o.record("v1", float(i + 1))
    o.record("v2", 5.0, empty=True)
    o.record("v2", 0.0, error=True)
    o.record_shadow("v2", 12.0, 0.5, 0.2)
    o.record_shadow("v2", None, None, None)
    snap = o.flush()
    assert o.flush() == {}  # a flush starts afresh
    other = {"versions": {"v1": {"requests": 1, "errors": 1, "empty": 0, "mixed": 1, "latency_ms": []}}}
    agg = aggregate([snap, other])
    assert agg["versions"]["v1"]["requests"] == 101 and agg["versions"]["v1"]["mixed"] == 1
    assert agg["versions"]["v1"]["p50_ms"] == 50.0 and agg["versions"]["v1"]["p99_ms"] == 99.0
    assert agg["versions"]["v2"]["error_rate"] == 0.5 and agg["versions"]["v2"]["empty_share"] == 0.5
    assert agg["shadow"]["v2"] == {"requests": 2, "errors": 1, "overlap_at_k": 0.5, "rank_correlation": 0.2,
                                   "p99_ms": 12.0}
    assert percentile([], 99) is None and percentile([3.0], 50) == 3.0


def replay(errors=0, empty=0, ms=10.0, n=20, overlap=0.6):
    timings = {"retrieval": [ms] * n, "ranking": [ms] * n, "total": [3 * ms] * n}
    figures = {"errors": errors, "empty": empty, "timings": timings}
    return {"requests": n, "green": figures, "blue_figures": figures, "overlap": [overlap] * n, "tau": [0.1] * n}


def test_the_gate_passes_a_sound_candidate_and_names_each_check_a_bad_one_fails():
    cfg = RolloutConfig()
    offline = {"retrieval recall@100": 0.40, "ranking purchase auc": 0.66}
    ok = evaluate_gate(cfg, {"ok": True}, replay(), offline, {**offline, "retrieval recall@100": 0.39})
    assert ok["passed"] and ok["diff"]["overlap_at_k"] == pytest.approx(0.6)
    bad = evaluate_gate(cfg, {"ok": False, "detail": "ranking down"}, replay(errors=2, ms=400.0), offline,
                        {**offline, "retrieval recall@100": 0.30})
    failed = {c["check"] for c in bad["checks"] if not c["passed"]}
    assert not bad["passed"]
    assert failed == {"health of every stage", "replay error rate", "replay p99 retrieval (ms)",
                      "replay p99 ranking (ms)", "replay p99 total (ms)", "offline retrieval recall@100"}
    strict = evaluate_gate(RolloutConfig(gate_min_overlap=0.9), {"ok": True}, replay(), offline, offline)
    assert [c["check"] for c in strict["checks"] if not c["passed"]] == ["answer overlap@10 with blue"]


def test_offline_figures_come_from_the_served_retrieval_model_and_the_ranker():
    metrics = {"retrieval_model": "two_tower", "retrieval": {"two_tower": {"recall@100": 0.5, "ndcg@10": 0.1},
                                                            "popularity": {"recall@100": 0.9}},
               "ranking": {"purchase": {"auc": 0.7}}}
    assert offline_figures(metrics) == {"retrieval recall@100": 0.5, "retrieval ndcg@10": 0.1,
                                        "ranking purchase auc": 0.7}


def test_live_guards_trip_on_errors_latency_empty_answers_and_at_once_on_a_mixed_answer():
    cfg = RolloutConfig(guard_min_requests=10)
    fine = {"requests": 50, "error_rate": 0.0, "p99_ms": 100.0, "empty_share": 0.0, "mixed": 0}
    assert tripped_guard(cfg, fine) is None and tripped_guard(cfg, None) is None
    assert "error rate" in tripped_guard(cfg, {**fine, "error_rate": 0.1})
    assert "p99" in tripped_guard(cfg, {**fine, "p99_ms": 5000.0})
    assert "empty" in tripped_guard(cfg, {**fine, "empty_share": 0.5})
    assert tripped_guard(cfg, {**fine, "requests": 3, "error_rate": 1.0}) is None  # too few to judge a ratio
    assert "mixed" in tripped_guard(cfg, {**fine, "requests": 1, "mixed": 1})
    with pytest.raises(ValueError, match="unknown stages"):
        RolloutConfig(gate_p99_budget_ms={"retrival": 1.0})


def test_the_routing_registry_steers_a_replica_to_each_published_routing():
    from deployments.ingress.admin import SteeringRegistry, publish
    from deployments.ingress.routing import RoutingSteering

    class Stages:  # stand-ins for a version's handles: the follower only stores them
        def __init__(self, v):
            self.v = v

    async def scenario() -> None:
        reg = SteeringRegistry()
        steering = RoutingSteering(reg, "r1", {v: Stages(v) for v in ("v1", "v2")})
        await steering.publish_base(Routing.make({"v1": 100}).to_dict())
        assert set(steering.live.stages) == {"v1"} and steering.live.choose("u1") == "v1"
        await asyncio.sleep(0)
        version, pending, applied = await publish(reg, Routing.make({"v1": 0, "v2": 1}).to_dict(), timeout_s=2.0)
        assert pending == [] and applied == 1
        assert steering.live.choose("u1") == "v2" and set(steering.live.stages) == {"v1", "v2"}
        await steering.leave()

    asyncio.run(scenario())


def test_a_ranker_that_loses_to_retrieval_order_is_flagged_not_refused():
    from deployments.rollout.gate import order_flags

    loses = {"serving_order": {"serve": "retrieval", "ranker_ndcg@10": 0.08, "retrieval_ndcg@10": 0.12}}
    (flag,) = order_flags(loses)
    assert "0.0800" in flag and "0.1200" in flag and "serves retrieval's order" in flag
    assert order_flags({"serving_order": {"serve": "ranker"}}) == [] and order_flags({}) == []
    fused = {"serving_order": {"serve": "fused", "ranker_ndcg@10": 0.10, "fused_ndcg@10": 0.14,
                               "retrieval_ndcg@10": 0.12}}
    (flag,) = order_flags(fused)  # the ranker alone still loses: flagged, and the fusion is what serves
    assert "serves fused's order" in flag
