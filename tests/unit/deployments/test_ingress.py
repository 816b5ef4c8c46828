"""Ingress logic that needs no cluster: routing, the HTTP schemas, the online store, admin steering, metrics."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from hypothesis import given, settings
from hypothesis import strategies as st

from deployments.ingress.routing import (assign_buckets, bucket_counts, choose_version, decode_table, encode_table,
                                         parse_weights)
from deployments.schemas import EventsRequest, RecommendRequest


def test_routing_is_sticky_and_close_to_the_weights():
    table = assign_buckets({"blue": 90.0, "green": 10.0})
    users = [f"user-{i}" for i in range(5000)]
    picks = [choose_version(u, table) for u in users]
    assert picks == [choose_version(u, assign_buckets({"blue": 90.0, "green": 10.0})) for u in users]
    assert 0.08 < picks.count("green") / len(users) < 0.12
    assert table.count("green") == 100


def test_a_zero_weight_version_gets_no_traffic_and_bad_weights_are_refused():
    assert {choose_version(f"u{i}", assign_buckets({"a": 0.0, "b": 1.0})) for i in range(200)} == {"b"}
    for bad in ({}, {"a": -1}, {"a": "x"}, {"a": 0, "b": 0}):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_adding_a_third_version_moves_only_users_of_the_version_that_shrinks():
    """The case of record: v1 90 / v2 10 -> v1 80 / v2 10 / v3 10 moved every v2 user to v3 with cumulative
    buckets; now v2 keeps all of its users and v3's come from v1."""
    before = assign_buckets({"v1": 90, "v2": 10})
    after = assign_buckets({"v1": 80, "v2": 10, "v3": 10}, before)
    moved = [(a, b) for a, b in zip(before, after) if a != b]
    assert set(moved) == {("v1", "v3")} and len(moved) == 100
    assert decode_table(encode_table(after)) == after


weights_st = st.dictionaries(st.sampled_from(["v1", "v2", "v3", "v4", "v5"]), st.integers(0, 20), min_size=1).filter(
    lambda w: sum(w.values()) > 0)


@settings(max_examples=300, deadline=None)
@given(st.lists(weights_st, min_size=2, max_size=6))
def test_re_weighting_moves_users_only_from_versions_that_shrink_to_versions_that_grow(history):
    """Any sequence of re-weightings, with versions coming and going: each step moves a bucket only from a version
    whose bucket count fell to one whose count rose, and as few as the change in counts requires."""
    table = assign_buckets(history[0])
    for weights in history[1:]:
        old_counts, new_counts = bucket_counts_of(table), bucket_counts(weights)
        new = assign_buckets(weights, table)
        assert bucket_counts_of(new) == {v: n for v, n in new_counts.items() if n}
        for a, b in zip(table, new):
            if a != b:
                assert new_counts.get(a, 0) < old_counts.get(a, 0) and new_counts[b] > old_counts.get(b, 0)
        moved = sum(a != b for a, b in zip(table, new))
        assert moved == sum(max(0, old_counts.get(v, 0) - new_counts.get(v, 0)) for v in set(old_counts) | set(
            new_counts))
        table = new


def bucket_counts_of(table):
    from collections import Counter

    return dict(Counter(table))


def test_a_routing_table_that_does_not_cover_the_buckets_is_refused():
    for bad in ([], [["v1", 0, 10]], [["v1", 0, 600], ["v2", 500, 1000]], [[1, 0, 1000]], "v1", [["v1", 0]]):
        with pytest.raises(ValueError, match="buckets"):
            decode_table(bad)


def test_recommend_request_bounds_k_and_refuses_unknown_fields():
    assert RecommendRequest(user_id="u1").k == 20
    for body in ({"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 501}, {"user_id": "u1", "surprise": 1},
                 {"user_id": "has space"}):
        with pytest.raises(ValidationError):
            RecommendRequest(**body)
    with pytest.raises(ValidationError, match="action"):
        EventsRequest(events=[{"user_id": "u", "item_id": "i", "action": "steal"}])


def test_admin_token_is_401_when_missing_and_403_when_wrong_or_unconfigured():
    import hashlib

    from fastapi import HTTPException

    from deployments.ingress.admin import check_admin_token

    digest = hashlib.sha256(b"s3cret").hexdigest()
    check_admin_token("Bearer s3cret", digest)  # accepted
    for header, expected_sha, status in ((None, digest, 401), ("Basic s3cret", digest, 401), ("Bearer ", digest, 401),
                                         ("Bearer guess", digest, 403), ("Bearer s3cret", None, 403)):
        with pytest.raises(HTTPException) as e:
            check_admin_token(header, expected_sha)
        assert e.value.status_code == status


def test_bad_admin_policy_is_a_422_naming_the_field():
    from fastapi import HTTPException

    from deployments.ingress.admin import parse_policy

    with pytest.raises(HTTPException) as e:
        parse_policy({"explore_epsilon": 3}, ["policy"])
    assert e.value.status_code == 422 and "explore_epsilon" in str(e.value.detail)
    assert parse_policy({"max_brand_run": 2}, ["policy"]).max_brand_run == 2


def test_registry_wakes_followers_tracks_what_each_replica_runs_and_keeps_admin_changes_over_same_base():
    import asyncio

    from deployments.ingress.admin import SteeringRegistry

    async def scenario() -> None:
        reg = SteeringRegistry()
        v1, _ = await reg.publish_base({"max_brand_run": 1})
        assert (await reg.publish_base({"max_brand_run": 1}))[0] == v1  # a second replica: no new version
        waiting = asyncio.create_task(reg.wait_newer("r1", v1, timeout_s=5.0))
        await asyncio.sleep(0)
        v2 = await reg.set({"max_brand_run": 3})
        assert await asyncio.wait_for(waiting, 1.0) == (v2, {"max_brand_run": 3})
        assert await reg.pending(v2) == ["r1"]  # r1 was last heard running v1
        await reg.wait_newer("r1", v2, timeout_s=0.01)
        assert await reg.pending(v2) == [] and await reg.applied(v2) == 1
        await reg.wait_newer("r0", v1, timeout_s=0.01)  # a replica that is rolled away before the next change
        v3 = await reg.set({"max_brand_run": 3})
        assert await reg.pending(v3) == ["r0", "r1"]
        await reg.leave("r0")
        assert await reg.pending(v3) == ["r1"]
        await reg.wait_newer("r1", v3, timeout_s=0.01)
        assert (await reg.publish_base({"max_brand_run": 1}))[1] == {"max_brand_run": 3}  # redeploy, same base
        assert (await reg.publish_base({"max_brand_run": 2}))[1] == {"max_brand_run": 2}  # changed base wins

    asyncio.run(scenario())


def test_answer_figures_count_brands_runs_novelty_and_rules():
    import numpy as np

    from deployments.ingress.metrics import answer_figures
    from training.request.contracts import RankedList

    ranked = RankedList(["a", "b", "c", "d"], np.array([4, 3, 2, 1]), ["x", "x", "y", "z"], ["c"] * 4,
                        ["retrieval", "policy:explore", "policy:explore", "policy:sponsored"],
                        created_at=np.array([0.0, 9.5, 9.9, 0.0]) * 86_400.0)
    fig = answer_figures(ranked, 3, now=10 * 86_400.0, new_item_days=1.0)  # items b and c are new
    assert fig == {"unique_brands": 2, "longest_brand_run": 2, "novelty": 2 / 3, "rules": {"explore": 2}}


def test_unknown_pages_share_one_surface_so_caches_and_metric_tags_stay_bounded():
    from deployments.ingress.admin import OTHER_SURFACE, SteeringRegistry, PolicySteering

    steering = PolicySteering(SteeringRegistry(), "replica-1")
    assert steering.surface("home") == "home" and steering.surface(None) == OTHER_SURFACE
    pages = [f"page-{i}" for i in range(500)] + ["\ud800 broken"]
    surfaces = {steering.surface(p) for p in pages}
    assert surfaces == {OTHER_SURFACE}
    for s in surfaces | {"home", "search"}:
        steering.config_for(s)
    assert len(steering._by_surface) == 3
    assert steering.config_for("home").explore_epsilon == 0.1  # the home preset


def test_the_openapi_contract_takes_json_bodies_and_names_every_route():
    from deployments.ingress.routes import app

    spec = app.openapi()
    assert {"/recommend", "/events", "/versions", "/healthz", "/admin/policy"} <= set(spec["paths"])
    for path in ("/recommend", "/events"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["$ref"].endswith(("RecommendRequest", "EventsRequest"))
        assert all(p["in"] != "query" for p in spec["paths"][path]["post"].get("parameters", []))
