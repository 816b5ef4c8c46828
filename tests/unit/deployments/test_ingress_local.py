"""The request path through the real deployments in Serve's local testing mode: the Ingress orchestrates the
version's Retrieval (over in-process FAISS shards) and Ranking, then the policy; no Ray cluster is started."""
from __future__ import annotations

import pytest
from fastapi import HTTPException

from deployments.calls import LocalCalls
from deployments.ranking import Ranking
from deployments.retrieval import Retrieval
from deployments.schemas import EventsRequest, PolicyUpdateRequest, RecommendRequest
from local_stack import TOKEN


def recommend(app, authorization=None, **body):
    """POST /recommend as the route sees it: (body, X-Request-Id, Authorization, X-API-Key)."""
    return app["handle"].recommend.remote(RecommendRequest(**body), None, authorization, None).result()


def test_a_request_runs_its_versions_retrieval_ranking_and_policy(local_app):
    out = recommend(local_app, user_id=local_app["user"], k=10)
    assert out.version == "v1" and not out.cold_start and len(out.items) == 10
    assert len({i.item_id for i in out.items}) == 10
    assert set(out.timings_ms) == {"features", "retrieval", "ranking", "policy", "total"}
    brands = [i.brand for i in out.items]
    assert all(a != b for a, b in zip(brands, brands[1:]))  # the policy's brand diversity ran on the ranked list


def test_an_unknown_user_gets_the_cold_start_list(local_app):
    out = recommend(local_app, user_id="nobody-seen-this-one", k=5)
    assert out.cold_start and {i.reason for i in out.items} <= {"cold_start:popular", "cold_start:new"}


def test_a_posted_purchase_sorts_the_item_down_in_the_next_answer(local_app):
    user = local_app["user"]
    first = recommend(local_app, user_id=user, k=5).items[0].item_id
    events = EventsRequest(events=[{"user_id": user, "item_id": first, "action": "purchase"}])
    answer = local_app["handle"].events.remote(events, None).result()
    assert answer.accepted == 1 and answer.durable is False  # the embedded store keeps events in memory only
    assert first not in [i.item_id for i in recommend(local_app, user_id=user, k=5).items]


def test_a_pinned_sponsored_item_is_ranked_and_placed_even_when_retrieval_missed_it(local_app):
    user = local_app["user"]
    shown = {i.item_id for i in recommend(local_app, user_id=user, k=200).items}
    catalog = local_app["shop"].catalog.column("item_id").to_pylist()
    outsider = next(i for i in catalog if i not in shown)
    out = recommend(local_app, f"Bearer {TOKEN}", user_id=user, k=10,
                    policy={"sponsored_items": [outsider], "sponsored_slots": [1]})
    assert out.items[1].item_id == outsider and out.items[1].reason == "policy:sponsored"


def test_operator_overrides_need_the_admin_token_and_client_ones_do_not(local_app):
    user = local_app["user"]
    for policy in ({"filter_out_of_stock": False}, {"sponsored_items": ["x"]}, {"max_per_category": 1},
                   {"explore_epsilon": 1.0, "max_brand_run": 2}):
        for auth in (None, "Bearer wrong"):
            with pytest.raises(HTTPException) as e:
                recommend(local_app, auth, user_id=user, k=5, policy=policy)
            assert e.value.status_code == 403, (policy, auth)
            if auth is None:  # names each operator field, and only those
                assert [d["loc"][-1] for d in e.value.detail] == sorted(set(policy) - {"max_brand_run"})
    assert len(recommend(local_app, user_id=user, k=5, policy={"max_brand_run": 2, "brand_diversity": False}).items) == 5
    assert len(recommend(local_app, f"Bearer {TOKEN}", user_id=user, k=5, policy={"max_per_category": 1}).items) == 5


def test_a_version_that_is_not_live_is_a_404_and_a_bad_override_a_422(local_app):
    with pytest.raises(HTTPException) as e:
        recommend(local_app, user_id="u1", k=5, version="v9")
    assert e.value.status_code == 404
    with pytest.raises(HTTPException) as e:
        recommend(local_app, user_id="u1", k=5, policy={"max_brand_run": 0})
    assert e.value.status_code == 422 and "max_brand_run" in str(e.value.detail)


def test_an_admin_policy_change_applies_to_the_next_request(local_app):
    handle, user = local_app["handle"], local_app["user"]
    blocked = recommend(local_app, user_id=user, k=10).items[0].category
    with pytest.raises(HTTPException) as e:
        handle.set_policy.remote(PolicyUpdateRequest(policy={"blocked_categories": [blocked]}), "Bearer wrong").result()
    assert e.value.status_code == 403
    state = handle.set_policy.remote(PolicyUpdateRequest(policy={"blocked_categories": [blocked]}),
                                     f"Bearer {TOKEN}").result()
    assert state.policy["blocked_categories"] == [blocked] and not state.pending_replicas
    assert blocked not in {i.category for i in recommend(local_app, user_id=user, k=10).items}
    handle.set_policy.remote(PolicyUpdateRequest(policy={}), f"Bearer {TOKEN}").result()


def test_versions_and_health_describe_the_live_version(local_app):
    versions = local_app["handle"].versions.remote().result().versions
    assert [(v.version, v.weight) for v in versions] == [("v1", 100.0)]
    health = local_app["handle"].healthz.remote().result()
    assert health.status_code == 200


def test_filters_hold_inside_retrieval_and_still_fill_the_list(local_app):
    catalog = local_app["shop"].catalog.to_pandas()
    category = catalog["category"].value_counts().index[3]  # a smaller category: few of the user's candidates
    cheap = float(catalog["price"].quantile(0.3))
    out = recommend(local_app, user_id=local_app["user"], k=20,
                    filters={"categories": [category], "price_max": cheap, "exclude_brands": ["b1"]})
    shown = catalog.set_index("item_id").loc[[i.item_id for i in out.items]]
    matching = catalog[(catalog["category"] == category) & (catalog["price"] <= cheap) & (catalog["brand"] != "b1")]
    assert len(out.items) == min(20, len(matching)) > 0
    assert (shown["category"] == category).all() and (shown["price"] <= cheap).all()
    assert (shown["brand"] != "b1").all()
    cold = recommend(local_app, user_id="someone-new", k=10, filters={"categories": [category]})
    assert cold.cold_start and {i.category for i in cold.items} == {category}


def test_bad_filters_are_refused_naming_the_field():
    from pydantic import ValidationError

    for filters, field in (({"price_min": 5, "price_max": 1}, "price_min"), ({"categories": ["c"] * 101}, "categories"),
                           ({"brands": [""]}, "brands"), ({"in_stok": True}, "in_stok"),
                           ({"price_max": float("nan")}, "price_max")):
        with pytest.raises(ValidationError) as e:
            RecommendRequest(user_id="u1", filters=filters)
        assert field in str(e.value)


def test_a_shard_that_fails_leaves_a_partial_answer_from_the_others_and_none_answering_is_an_error(local_app):
    import asyncio

    from training.request.contracts import RetrievalRequest

    class DeadShard:
        def search(self, xq, k, allowed=None):
            raise ConnectionError("shard process gone")

        def stats(self):
            raise ConnectionError("shard process gone")

    good = local_app["shards"][0]
    retrieval = Retrieval.func_or_class(local_app["bundle"], 1, shards=[LocalCalls(good), LocalCalls(DeadShard())])
    state = local_app["state"].get(local_app["user"])
    found = asyncio.run(retrieval.retrieve(RetrievalRequest(state, {}, 50)))
    assert found.partial and len(found.item_idx) == 50
    from indexing.index_types import stored_ids

    assert set(found.item_idx.tolist()) <= set(stored_ids(good.index).tolist())  # all from the shard that answered
    asyncio.run(retrieval.check_health())  # one shard left: still healthy, answers are partial
    dead = Retrieval.func_or_class(local_app["bundle"], 1, shards=[LocalCalls(DeadShard())] * 2)
    with pytest.raises(ConnectionError):
        asyncio.run(dead.retrieve(RetrievalRequest(state, {}, 50)))
    with pytest.raises(RuntimeError, match="no index shard"):
        asyncio.run(dead.check_health())


def test_every_part_of_an_answer_belongs_to_the_version_that_served_it(local_app):
    out = recommend(local_app, user_id=local_app["user"], k=5)
    assert out.stage_versions == {"retrieval": "v1", "index": "v1", "ranking": "v1"}


def test_ranking_refuses_candidates_of_another_version(local_app):
    import asyncio
    import dataclasses

    from training.request.contracts import RankRequest, RetrievalRequest

    retrieval = Retrieval.func_or_class(local_app["bundle"], 1, shards=[LocalCalls(s) for s in local_app["shards"]])
    ranking = Ranking.func_or_class(local_app["bundle"], 1, False)
    found = asyncio.run(retrieval.retrieve(RetrievalRequest(local_app["state"].get(local_app["user"]), {}, 50)))
    assert found.version == found.index_version == "v1"
    assert asyncio.run(ranking.rank(RankRequest(found, 10))).version == "v1"
    with pytest.raises(ValueError, match="candidates of version 'v2'"):
        asyncio.run(ranking.rank(RankRequest(dataclasses.replace(found, version="v2"), 10)))
