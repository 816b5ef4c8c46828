"""The request-time cores after live catalog changes: retrieval embeds a new item from its attributes with the
version's own item tower, never returns a deleted item, offers new items to cold starts; ranking scores items new
to the bundle and carries their attributes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from training.data.changes import ItemChange
from tests.unit.tiny_bundle import write_tiny_bundle
from training.fit.bundle import load_bundle
from training.fit.offline_metrics import item_vectors
from training.request.contracts import Candidates, ItemFilter, RankRequest, RetrievalRequest
from training.request.ranking import RankingCore
from training.request.retrieval import RetrievalCore


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_bundle(write_tiny_bundle(tmp_path_factory.mktemp("bundle"))[1])


def test_the_item_tower_embeds_known_items_as_the_index_did_and_new_ones_from_their_attributes(bundle):
    core = RetrievalCore.from_bundle(bundle)
    n = core.forward.n_trained
    idx = np.arange(1, n + 1)
    assert np.allclose(core.item_vectors(idx), item_vectors(bundle.two_tower())[idx], atol=1e-5)
    brand, category = core.forward.brands[1], core.forward.categories[1]
    update = core.forward.apply([ItemChange("upsert", "brand-new", brand, category, float(core.forward.price[1]),
                                            created_at=2e9)])  # the log stamps the write time
    core.applied(update)
    new = core.item_vectors(np.asarray([n + 1]))
    assert new.shape == (1, 64) and np.isclose(np.linalg.norm(new), 1.0, atol=1e-5)
    with torch.inference_mode():  # the unknown-item row plus the item's brand, category and price
        expected = bundle.two_tower().item_tower(*(torch.tensor([v]) for v in (
            0, *(bundle.item_features().__dict__[k][1] for k in ("brand_idx", "category_idx", "price_bucket")))))
    assert np.allclose(new, expected.numpy(), atol=1e-5)
    assert core.item_category[n + 1] == core.item_category[1]
    assert core.newest[0] == n + 1  # the newest item of all, offered to cold starts


def test_deleted_items_leave_every_answer_and_stock_changes_apply_to_filters_at_once(bundle):
    core = RetrievalCore.from_bundle(bundle)
    popular = core.by_popularity[:3]
    gone = core.forward.item_ids[popular[0]]
    core.applied(core.forward.apply([ItemChange("delete", gone),
                                     ItemChange("update", core.forward.item_ids[popular[1]], in_stock=False)]))
    features = core.encode(RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 50),
                           0.0)
    cold = core.cold_start(features, 50)
    assert popular[0] not in cold.item_idx and popular[1] in cold.item_idx
    in_stock = core.cold_start(features, 50, core.allowed(RetrievalRequest(
        {"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 50, ItemFilter(in_stock=True))))
    assert popular[1] not in in_stock.item_idx
    I = np.asarray([[popular[0], popular[2], -1]])
    merged = core.merge(features, None, np.asarray([[0.9, 0.8, -np.inf]], np.float32), I, 3)
    assert merged.item_idx.tolist() == [popular[2]]  # a shard that has not removed it yet cannot serve it


def test_ranking_scores_items_new_to_the_bundle_and_leaves_deleted_pinned_items_out(bundle):
    core = RankingCore.from_bundle(bundle)
    n = core.forward.n_trained
    core.forward.apply([ItemChange("upsert", "brand-new", "b-x", "c-x", 3.0), ItemChange("delete", "i1")])
    features = RetrievalCore.from_bundle(bundle).encode(
        RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 2), 0.0)
    cands = Candidates(features, np.asarray([1 + 1, n + 1], np.int64), np.zeros(2, np.float32), ("retrieval",) * 2)
    ranked = core.rank([RankRequest(cands, 10, ("i1", "brand-new"))])[0]
    assert set(ranked.item_ids) == {core.forward.item_ids[2], "brand-new"}  # i1 is deleted: not pinned
    at = ranked.item_ids.index("brand-new")
    assert (ranked.brands[at], ranked.categories[at], bool(ranked.in_stock[at])) == ("b-x", "c-x", True)


def test_ranking_leaves_out_a_candidate_it_has_not_heard_of_yet(bundle):
    """Retrieval's replica applied a new item a moment before this ranking replica: the item waits, nothing fails."""
    core = RankingCore.from_bundle(bundle)
    n = core.forward.n_trained
    features = RetrievalCore.from_bundle(bundle).encode(
        RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 3), 0.0)
    cands = Candidates(features, np.asarray([3, n + 1, 4], np.int64), np.zeros(3, np.float32),
                       ("retrieval", "retrieval", "interest:1"))
    ranked = core.rank([RankRequest(cands, 1, (core.forward.item_ids[7],))])[0]
    assert sorted(ranked.reasons) == ["pinned", "retrieval"] and len(ranked.item_ids) == 2


def test_a_version_that_serves_retrieval_order_keeps_the_candidates_order(bundle):
    """The version's evaluation found its ranker makes the list worse: ranking keeps retrieval's order, pinned
    items after the candidates, and still knows every item's attributes."""
    core = RankingCore(bundle.ranker(), bundle.space, RankingCore.from_bundle(bundle).forward, order="retrieval")
    features = RetrievalCore.from_bundle(bundle).encode(
        RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 4), 0.0)
    cands = Candidates(features, np.asarray([9, 3, 7, 5], np.int64), np.zeros(4, np.float32),
                       ("interest:0", "interest:1", "interest:0", "condition:category=c1"))
    pinned = core.forward.item_ids[11]
    ranked = core.rank([RankRequest(cands, 3, (pinned,))])[0]
    ids = core.forward.item_ids
    assert ranked.item_ids == [ids[9], ids[3], ids[7], pinned]  # the best 3 in retrieval's order, then the pinned
    assert ranked.reasons == ["interest:0", "interest:1", "interest:0", "pinned"]
    assert list(ranked.scores) == sorted(ranked.scores, reverse=True)
    with pytest.raises(ValueError, match="order must be one of"):
        RankingCore(bundle.ranker(), bundle.space, core.forward, order="random")


def test_a_version_that_serves_the_fused_order_ranks_by_the_fusion_of_both_orders(bundle):
    from training.request.ranking import RRF_K, fuse_with_retrieval

    forward = RankingCore.from_bundle(bundle).forward
    features = RetrievalCore.from_bundle(bundle).encode(
        RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 4), 0.0)
    items = np.asarray([9, 3, 7, 5, 12, 2], np.int64)
    cands = Candidates(features, items, np.linspace(1, 0, 6).astype(np.float32), ("retrieval",) * 6)
    by_ranker = RankingCore(bundle.ranker(), bundle.space, forward).rank([RankRequest(cands, 6)])[0]
    fused = RankingCore(bundle.ranker(), bundle.space, forward, order="fused").rank([RankRequest(cands, 6)])[0]
    ranker_rank = {i: j + 1 for j, i in enumerate(by_ranker.item_ids)}
    ids = [forward.item_ids[i] for i in items]
    want = sorted(ids, key=lambda i: -(1 / (RRF_K + ranker_rank[i]) + 1 / (RRF_K + ids.index(i) + 1)))
    assert fused.item_ids == want and list(fused.scores) == sorted(fused.scores, reverse=True)
    np.testing.assert_allclose(fuse_with_retrieval(np.array([[0.0, 1.0]])), [[1 / 62 + 1 / 61, 1 / 61 + 1 / 62]])
    cold = RetrievalCore.from_bundle(bundle).cold_start(features, 40)  # a cold-start list keeps its interleave
    out = RankingCore(bundle.ranker(), bundle.space, forward, order="fused").rank([RankRequest(cold, 40)])[0]
    assert out.item_ids == [forward.item_ids[i] for i in cold.item_idx]
    assert out.reasons[:2] == ["cold_start:popular", "cold_start:new"]


def test_the_best_of_three_orders_is_served_and_a_tie_keeps_the_ranker(bundle):
    from training.fit.offline_metrics import best_order, fused_order

    assert best_order({"ranker": 0.1, "fused": 0.2, "retrieval": 0.15}) == "fused"
    assert best_order({"ranker": 0.2, "fused": 0.2, "retrieval": 0.2}) == "ranker"
    assert best_order({"ranker": 0.1, "fused": 0.15, "retrieval": 0.15}) == "fused"
    assert best_order({"ranker": 0.1, "fused": 0.12, "retrieval": 0.15}) == "retrieval"
    # The ranker swaps the first two of retrieval's three: by reciprocal ranks the fusion keeps a tie in
    # retrieval's order, and a padded slot stays empty.
    cands, reranked = np.array([[5, 6, 7, 0]]), np.array([[6, 5, 7, 0]])
    assert fused_order(cands, reranked).tolist() == [[5, 6, 7, 0]]


def test_the_serving_order_check_prefers_retrieval_when_the_ranker_does_worse(bundle):
    from training.data.splits import leave_last_out
    from training.data.synthetic import generate_shop
    from training.fit.offline_metrics import serving_order

    task = leave_last_out(generate_shop("tiny", 0), max_users=60)
    ranked = np.zeros((60, 500), np.int64)
    rng = np.random.default_rng(0)
    for u, t in enumerate(task.targets):  # retrieval puts the target first, 499 random others after it
        others = rng.choice(np.setdiff1d(np.arange(1, task.space.n_items + 1), t), 499, replace=False)
        ranked[u] = np.r_[t[:1], others]
    out = serving_order(bundle.ranker(), ranked, task)  # an untrained ranker cannot beat a perfect first slot
    assert out["serve"] == "retrieval" and out["retrieval_ndcg@10"] == pytest.approx(1.0)
    assert out["fused_ndcg@10"] < 1.0  # nor can its fusion with retrieval, which moves the target down
    assert out["ranker_ndcg@10"] < 1.0 and out["users"] == 60 and out["candidates"] == 500
    worst = np.roll(ranked, -1, axis=1)  # the target last: any ranker order is at least as good
    assert serving_order(bundle.ranker(), worst, task)["serve"] == "ranker"


def test_ranking_keeps_new_candidates_below_the_cut_for_the_policys_exploration(bundle):
    """With `new_since`, the new candidates that rank below n_out come along (after the best n_out), so exploration
    draws from every retrieved new item."""
    core = RankingCore(bundle.ranker(), bundle.space, RankingCore.from_bundle(bundle).forward, order="retrieval")
    features = RetrievalCore.from_bundle(bundle).encode(
        RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 6), 0.0)
    created = core.forward.created_s
    newest = np.argsort(-created[1:])[:2] + 1  # the two newest items of the catalog
    old = [i for i in range(1, 40) if i not in newest][:4]
    idx = np.asarray(old + list(newest), np.int64)  # the new ones retrieved last
    cands = Candidates(features, idx, np.zeros(len(idx), np.float32), ("retrieval",) * len(idx))
    since = float(created[newest].min())
    plain = core.rank([RankRequest(cands, 3)])[0]
    kept = core.rank([RankRequest(cands, 3, (), since)])[0]
    ids = core.forward.item_ids
    assert plain.item_ids == [ids[i] for i in old[:3]]
    assert kept.item_ids == [ids[i] for i in old[:3]] + [ids[i] for i in newest]


def test_a_cold_start_list_takes_popular_and_new_items_in_turn(bundle):
    core = RetrievalCore.from_bundle(bundle)
    features = core.encode(RetrievalRequest({"items": [], "actions": [], "timestamps": [], "bought_at": {}}, {}, 6),
                           0.0)
    cold = core.cold_start(features, 6)
    assert list(cold.reasons) == ["cold_start:popular", "cold_start:new"] * 3
    assert cold.item_idx[0] == core.by_popularity[0] and len(set(cold.item_idx.tolist())) == 6


def test_serving_sends_the_ranker_the_retrieval_score_its_training_examples_carry(bundle):
    from training.fit.ranker_data import retrieval_scores
    from training.models.ranker import MultiTaskRanker, RankerConfig

    core = RetrievalCore.from_bundle(bundle)
    assert not core.score_for_ranker  # this bundle's ranker takes no retrieval score: none is computed
    for order, wanted in (("ranker", True), ("fused", True), ("retrieval", False)):  # a ranker that takes them
        config = {**bundle.config, "ranker": {**bundle.config.get("ranker", {}), "retrieval_feature": True},
                  "retrieval": {**bundle.config.get("retrieval", {}), "order": order}}
        assert RetrievalCore.from_bundle(dataclasses.replace(bundle, config=config)).score_for_ranker == wanted
    core.score_for_ranker = True
    req = RetrievalRequest({"items": list(core.forward.item_ids[1:4]), "actions": ["click"] * 3,
                            "timestamps": [1.0, 2.0, 3.0], "bought_at": {}}, {}, 20)
    features = core.encode(req, 10.0)
    q = core.queries(features)
    idx = np.arange(1, 21)
    cands = core.merge(features, q, np.zeros((1, 20), np.float32), idx[None, :], 20)
    want = retrieval_scores(bundle.two_tower(), tuple(features[k] for k in ("hist_items", "hist_actions",
                                                                            "hist_ages", "context")), idx[None, :])[0]
    np.testing.assert_allclose(cands.user_scores, want, rtol=1e-4, atol=1e-5)
    cold = core.cold_start(features, 5)
    assert cold.user_scores is not None and len(cold.user_scores) == len(cold.item_idx)
    ranker = MultiTaskRanker(RankerConfig(**bundle.space.sizes, retrieval_feature=True)).eval()
    ranking = RankingCore(ranker, bundle.space, core.forward)
    pinned = core.forward.item_ids[30]  # not a candidate: ranked with the lowest candidate's score
    out = ranking.rank([RankRequest(cands, 30, pinned_items=(pinned,))])[0]
    assert pinned in out.item_ids and len(out.item_ids) == 21
    bare = Candidates(cands.features, cands.item_idx, cands.scores, cands.reasons)
    with pytest.raises(ValueError, match="user_scores"):
        ranking.rank([RankRequest(bare, 30)])
