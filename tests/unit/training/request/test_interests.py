"""The serving merge of multi-interest retrieval: quotas, de-duplication, round-robin, reasons, conditions."""
from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa
import pytest
import torch

from indexing.shards import FaissShard, merge_top_k
from training.data.features import FeatureSpace, query_tokens
from training.fit.offline_metrics import item_vectors
from training.models.multi_interest import MultiInterestConfig, MultiInterestModel
from training.request.interests import (ConditionConfig, category_query_buckets, explicit_conditions, interest_queries,
                                        interest_quotas, merge_interests, merge_queries, relevant)
from training.request.forward import ForwardIndex
from training.request.retrieval import QueryCache, RetrievalCore


def _lists(*ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Result lists with descending scores."""
    return [(np.array(x, dtype=np.int64), np.linspace(1.0, 0.5, len(x)).astype(np.float32)) for x in ids]


def test_quotas_follow_importance_and_give_conditions_equal_shares():
    assert interest_quotas(np.array([0.75, 0.25]), [False, False], 8).tolist() == [6, 2]
    # Two conditions of three lists take a third of k each; the one interest takes the rest.
    assert interest_quotas(np.array([0.9, 0.0, 0.0]), [False, True, True], 9).tolist() == [3, 3, 3]
    q = interest_quotas(np.array([0.5, 0.3, 0.2, 0.0]), [False, False, False, True], 10)
    assert q.sum() == 10 and q[3] in (2, 3)  # 10 / 4 = 2.5 slots for the condition
    assert q[0] >= q[1] >= q[2] and q[0] > q[2]


def test_round_robin_takes_turns_within_quotas():
    items, scores, reasons = merge_interests(_lists([1, 2, 3, 4], [11, 12, 13, 14]), np.array([0.5, 0.5]), 4,
                                             [False, False], ["interest:0", "interest:1"])
    assert items.tolist() == [1, 11, 2, 12]
    assert reasons == ["interest:0", "interest:1", "interest:0", "interest:1"]
    assert scores.dtype == np.float32 and scores[0] == 1.0


def test_importance_quota_limits_a_minor_interest():
    items, _, reasons = merge_interests(_lists([1, 2, 3, 4, 5], [11, 12, 13, 14, 15]), np.array([0.75, 0.25]), 4,
                                        [False, False], ["interest:0", "interest:1"])
    assert items.tolist() == [1, 11, 2, 3]
    assert reasons.count("interest:1") == 1


def test_duplicates_keep_the_first_reason_and_do_not_use_up_a_slot():
    items, _, reasons = merge_interests(_lists([1, 2, 3], [1, 2, 7, 8]), np.array([0.5, 0.5]), 4,
                                        [False, False], ["interest:0", "interest:1"])
    # Interest 1's first item was taken by interest 0, so it gives its next one instead: 2, then 7.
    assert items.tolist() == [1, 2, 3, 7]
    assert reasons == ["interest:0", "interest:1", "interest:0", "interest:1"]
    assert len(set(items.tolist())) == len(items)


def test_slots_left_by_a_short_list_go_to_the_others_and_padding_is_skipped():
    items, _, reasons = merge_interests(_lists([5, -1, 0], [11, 12, 13, 14]), np.array([0.5, 0.5]), 4,
                                        [False, False], ["interest:0", "condition:category=c2"])
    assert items.tolist() == [5, 11, 12, 13]
    assert reasons == ["interest:0"] + ["condition:category=c2"] * 3


def test_fewer_items_than_k_returns_all_of_them():
    items, _, _ = merge_interests(_lists([1, 2], [2, 3]), np.array([1.0, 0.0]), 10, [False, True], ["a", "b"])
    assert sorted(items.tolist()) == [1, 2, 3]


def test_merge_names_the_mismatched_inputs():
    with pytest.raises(ValueError, match="importance"):
        merge_interests(_lists([1], [2]), np.array([1.0]), 3, [False, False], ["a", "b"])
    with pytest.raises(ValueError, match="k must be"):
        merge_interests(_lists([1]), np.array([1.0]), 0, [False], ["a"])


def test_relevance_filter_keeps_the_category_or_high_scores():
    category = np.array([0, 1, 2, 1, 2])
    items, scores = relevant(np.array([1, 2, 3, 4, -1]), np.array([0.5, 0.95, 0.4, 0.3, 0.99]), 1, category, 0.9)
    assert items.tolist() == [1, 2, 3] and scores.tolist() == [0.5, 0.95, 0.4]


def test_conditions_come_from_context_query_and_most_engaged_category():
    categories = ["shoes", "bags", "hats"]
    qcat = category_query_buckets(categories)
    assert qcat[query_tokens(["bags"])[0, 0]] == 2
    item_category = np.array([0, 1, 1, 3, 3, 3])
    hist = np.array([[0, 3, 4, 5, 3, 1], [0, 0, 0, 0, 1, 2]])  # user 0: four actions in category 3
    ctx = np.zeros((2, 8), dtype=np.int64)
    ctx[1, 3] = 2  # user 1 is on the "bags" page ...
    ctx[1, 4:8] = query_tokens(["red hats"])[0]  # ... searching for hats
    conds = explicit_conditions(hist, ctx, item_category, qcat, ConditionConfig(min_follow_actions=4))
    assert conds == [[(3, "followed")], [(2, "context"), (3, "query")]]
    assert explicit_conditions(hist, ctx, item_category, qcat, ConditionConfig(from_query=False, max_followed=0)) \
        == [[], [(2, "context")]]


def test_serving_path_over_faiss_shards_equals_the_exact_merge():
    torch.manual_seed(0)
    sizes = dict(n_items=41, n_brands=3, n_categories=4, n_price_buckets=3, n_countries=2, n_devices=2, n_pages=2,
                 n_actions=6, n_ages=24, n_query_buckets=1025)
    model = MultiInterestModel(MultiInterestConfig(**sizes, dim=8)).eval()
    item_category = np.concatenate([[0], np.repeat([1, 2, 3, 3], 10)])
    model.items.set_item_features(torch.ones(41, dtype=torch.long), torch.from_numpy(item_category),
                                  torch.ones(41, dtype=torch.long))
    V = item_vectors(model)
    shards = [FaissShard(8), FaissShard(8)]
    ids = np.arange(1, 41)
    for s, shard in enumerate(shards):
        shard.add(ids[ids % 2 == s], V[ids[ids % 2 == s]])

    async def search(xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts = [sh.search(xq, k) for sh in shards]
        return merge_top_k([p[0] for p in parts], [p[1] for p in parts], k)

    ctx = np.zeros((1, 8), dtype=np.int64)
    ctx[0, 3] = 2  # a category page: one explicit condition besides the implicit interests
    features = {"hist_items": np.array([[1, 2, 3, 11, 12, 13, 21, 22, 23]]), "hist_actions": np.full((1, 9), 2),
                "hist_ages": np.full((1, 9), 3), "context": ctx}
    names = ["c1", "c2", "c3"]
    space = FeatureSpace([f"i{j}" for j in range(1, 41)], ["b1", "b2"], names, ["DE"], ["app"], ["home"], [1.0])
    items = pa.table({"item_id": space.item_ids, "brand": ["b1"] * 40, "category": [names[c - 1] for c in item_category[1:]],
                      "price": np.ones(40), "in_stock": np.ones(40, bool),
                      "created_at": pa.array(np.arange(40) * 1000, pa.timestamp("ms", tz="UTC"))})
    core = RetrievalCore(model, space, item_category, np.arange(40.0), ForwardIndex(items), "multi_interest")
    q_serving = core.queries(features)
    found = core.merge(features, q_serving, *asyncio.run(search(q_serving.xq, 12)), 12)
    items, scores, reasons = found.item_idx, found.scores, list(found.reasons)
    assert len(items) == 12 and len(set(items.tolist())) == 12
    assert {r.split(":")[0] for r in reasons} == {"interest", "condition"}
    from_condition = items[[r == "condition:category=c2" for r in reasons]]
    assert (item_category[from_condition] == 2).all()  # the relevance filter holds on the serving path
    # The same merge over an exact search of the whole catalog gives the same answer.
    conds = explicit_conditions(features["hist_items"], ctx, item_category, category_query_buckets(names),
                                ConditionConfig())
    q = interest_queries(model, *features.values(), conds, names)
    exact = q.xq @ V.T  # (nq, 41)
    exact[:, 0] = -np.inf
    I = np.argsort(-exact, axis=1, kind="stable")[:, :12]
    want_items, want_scores, want_reasons = merge_queries(np.take_along_axis(exact, I, 1), I, q, 1, 12, item_category,
                                                          ConditionConfig().min_score)[0]
    assert items.tolist() == want_items.tolist() and reasons == want_reasons
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5)


def test_query_cache_reuses_a_vector_only_for_the_same_user_state():
    cache, calls = QueryCache(size=2), []
    state = {"hist_items": np.array([[0, 5]]), "hist_actions": np.array([[0, 2]]), "hist_ages": np.array([[0, 3]]),
             "context": np.zeros((1, 8), dtype=np.int64)}
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731 - counts the tower passes
    assert cache.get_or_compute(state, compute) == cache.get_or_compute(dict(state), compute) == 1
    older = state | {"hist_ages": np.array([[0, 4]])}  # the same action, an age bucket later: a new state
    clicked = state | {"hist_items": np.array([[5, 7]]), "hist_actions": np.array([[2, 2]])}
    assert cache.get_or_compute(older, compute) == 2 and cache.get_or_compute(clicked, compute) == 3
    assert (cache.hits, cache.misses) == (1, 3)
    assert cache.get_or_compute(state, compute) == 4  # evicted: the cache holds the 2 most recent states
