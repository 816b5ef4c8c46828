"""Multi-interest retrieval: capsule routing, the label-aware interest choice, conditions, and a tiny training run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.fit.bundle import load_bundle, write_bundle
from training.data.features import build_feature_space
from training.request.interests import ConditionConfig
from training.models.multi_interest import (InterestRouting, MultiInterestConfig, MultiInterestModel, assign_interest,
                                            interest_count, squash)
from training.request.interests import interest_queries, merge_queries
from training.fit.offline_metrics import item_vectors
from training.fit.version import items_table
from training.models.ranker import MultiTaskRanker, RankerConfig
from training.data.synthetic import generate_shop

SIZES = dict(n_items=61, n_brands=4, n_categories=4, n_price_buckets=3, n_countries=2, n_devices=2, n_pages=2,
             n_actions=6, n_ages=24, n_query_buckets=1025)


def _history(B: int = 3, L: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    items = torch.randint(1, 61, (B, L), generator=g)
    return items, torch.randint(1, 6, (B, L), generator=g), torch.randint(1, 24, (B, L), generator=g), \
        torch.zeros(B, 8, dtype=torch.long)


def test_squash_keeps_direction_and_bounds_the_norm_below_one():
    z = torch.tensor([[3.0, 4.0], [0.03, 0.04]])
    v = squash(z)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), z / z.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(v.norm(dim=-1), torch.tensor([25 / 26, 0.0025 / 1.0025]))


def test_interest_count_grows_with_log2_of_the_history_and_is_capped():
    n = torch.tensor([0, 1, 2, 3, 4, 5, 8, 9, 20])
    assert interest_count(n, 4).tolist() == [1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert interest_count(n, 2).max().item() == 2


def test_routing_shapes_single_assignment_and_masked_capsules():
    torch.manual_seed(0)
    routing = InterestRouting(dim=8, max_interests=4, iterations=3)
    tokens = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [False, False, False, False, True, True]])
    caps, w, cap_mask, u_hat = routing(tokens, mask)
    assert caps.shape == (2, 4, 8) and w.shape == (2, 6, 4) and u_hat.shape == (2, 6, 8)
    assert cap_mask.sum(1).tolist() == [3, 1]  # ceil(log2 6) = 3, ceil(log2 2) = 1
    torch.testing.assert_close(w.sum(-1), mask.float())  # each present behaviour spreads exactly 1 over capsules
    assert (w[~cap_mask[:, None, :].expand_as(w)] == 0).all()  # unused capsules receive nothing
    assert (caps.norm(dim=-1) < 1).all()


def test_interests_are_deterministic_and_ignore_padding():
    model = MultiInterestModel(MultiInterestConfig(**SIZES, dim=16)).eval()
    items, actions, ages, ctx = _history()
    V, imp, mask = model.user_interests(items, actions, ages, ctx)
    V2, imp2, _ = model.user_interests(items, actions, ages, ctx)
    assert torch.equal(V, V2) and torch.equal(imp, imp2)
    pad = torch.zeros(3, 5, dtype=torch.long)
    Vp, impp, maskp = model.user_interests(*(torch.cat([pad, x], dim=1) for x in (items, actions, ages)), ctx)
    torch.testing.assert_close(Vp, V)
    torch.testing.assert_close(impp, imp)
    assert torch.equal(maskp, mask)
    torch.testing.assert_close(imp.sum(1), torch.ones(3))
    torch.testing.assert_close(V[mask].norm(dim=-1), torch.ones(int(mask.sum())))


def test_routing_without_attention_ignores_the_order_of_behaviours():
    model = MultiInterestModel(MultiInterestConfig(**SIZES, dim=16, n_layers=0)).eval()
    items, actions, ages, ctx = _history()
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])  # no positional input: a reordered history has the same interests
    torch.testing.assert_close(model.user_interests(items[:, perm], actions[:, perm], ages[:, perm], ctx)[0],
                               model.user_interests(items, actions, ages, ctx)[0])


def test_recent_behaviours_weigh_more_in_importance_with_a_half_life():
    w = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # (1, L=3, K=2): the newest behaviour is capsule 1's
    mask = torch.ones(1, 3, dtype=torch.bool)
    flat = MultiInterestModel(MultiInterestConfig(**SIZES, dim=8))._importance(w, mask)
    recent = MultiInterestModel(MultiInterestConfig(**SIZES, dim=8, recency_half_life=1.0))._importance(w, mask)
    torch.testing.assert_close(flat, torch.tensor([[2 / 3, 1 / 3]]))
    torch.testing.assert_close(recent, torch.tensor([[0.75 / 1.75, 1 / 1.75]]))


def test_user_tower_is_the_unit_importance_weighted_mean_of_interests():
    model = MultiInterestModel(MultiInterestConfig(**SIZES, dim=16)).eval()
    batch = _history()
    V, imp, _ = model.user_interests(*batch)
    expected = torch.nn.functional.normalize((V * imp[..., None]).sum(1), dim=-1)
    torch.testing.assert_close(model.user_tower(*batch), expected)


def test_assign_interest_picks_the_closest_used_interest():
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]],
                              [[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]])
    mask = torch.tensor([[True, True, True], [True, False, True]])
    target = torch.tensor([[0.6, 0.8], [0.1, 1.0]])
    # Row 0: 0.6 / 0.8 / 0.98 -> capsule 2. Row 1: capsule 1 would win but is unused, so capsule 0.
    assert assign_interest(interests, mask, target).tolist() == [2, 0]


def test_condition_changes_the_query_and_training_loss_is_finite_with_gradients_everywhere():
    torch.manual_seed(0)
    model = MultiInterestModel(MultiInterestConfig(**SIZES, dim=16))
    items, actions, ages, ctx = _history(B=8)
    a = model.condition_tower(items, actions, ages, ctx, torch.full((8,), 1))
    b = model.condition_tower(items, actions, ages, ctx, torch.full((8,), 2))
    assert a.shape == (8, 16) and not torch.allclose(a, b)
    loss = model(items, actions, ages, ctx, torch.randint(1, 61, (8,)))
    loss.backward()
    assert torch.isfinite(loss)
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient break DDP: {missing}"


def _two_interest_data(n_users: int = 160, L: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Items 1-20 are category 1, 21-40 category 2, 41-60 category 3. Every user engages with two categories,
    half of the history in each, and the target is a further item of either; item ids carry the signal."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("hist_items", "hist_actions", "hist_ages", "context", "target")}
    for u in range(n_users):
        pair = [(0, 1), (0, 2), (1, 2)][u % 3]
        for _ in range(6):
            hist = np.concatenate([1 + 20 * c + rng.choice(20, L // 2) for c in pair])
            rows["hist_items"].append(rng.permutation(hist))
            rows["hist_actions"].append(np.full(L, 2))
            rows["hist_ages"].append(np.full(L, 3))
            rows["context"].append(np.zeros(8, dtype=np.int64))
            rows["target"].append(1 + 20 * pair[rng.integers(2)] + rng.integers(20))
    data = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items()}
    category = np.concatenate([[0], np.repeat([1, 2, 3], 20)])
    return data | {"item_brand": np.ones(61, np.int64), "item_category": category,
                   "item_price": np.ones(61, np.int64), "item_counts": np.bincount(data["target"], minlength=61)}


@pytest.fixture
def one_thread():
    """Small matrices: thread start-up costs more than it saves, and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _fit(data: dict[str, np.ndarray], inputs: tuple[str, ...], steps: int = 150) -> MultiInterestModel:
    torch.manual_seed(0)
    model = MultiInterestModel(MultiInterestConfig(**SIZES, dim=16, max_interests=2, temperature=0.1))
    model.prepare(data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    order = np.random.default_rng(0).permutation(len(data["target"]))
    for step in range(steps):
        idx = order[(step * 64) % len(order):][:64]
        loss = model(*(torch.from_numpy(data[k][idx]) for k in inputs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()



def test_a_trained_two_interest_user_is_served_both_interests(one_thread):
    data = _two_interest_data()
    inputs = ("hist_items", "hist_actions", "hist_ages", "context", "target")
    model = _fit(data, inputs)
    user = {k: data[k][:1] for k in inputs[:4]}  # user 0 engages with categories 1 and 2
    q = interest_queries(model, *user.values(), [[]], ["c1", "c2", "c3"])
    assert len(q.xq) == 2
    scores = q.xq @ item_vectors(model).T  # (2, 61)
    scores[:, 0] = -np.inf
    top_cats = data["item_category"][np.argsort(-scores, axis=1)[:, :10]]  # (2, 10)
    dominant = [np.bincount(row, minlength=4).argmax() for row in top_cats]
    assert sorted(dominant) == [1, 2], f"each interest should cover one category, got top categories {top_cats}"
    I = np.argsort(-scores, axis=1)[:, :20]
    items, _, reasons = merge_queries(np.take_along_axis(scores, I, 1), I, q, 1, 10, data["item_category"], 0.9)[0]
    served = set(data["item_category"][items].tolist())
    assert {1, 2} <= served and set(reasons) == {"interest:0", "interest:1"}
    assert 3 not in served  # the category the user never touched stays out


def test_bad_configs_are_refused_naming_the_field():
    with pytest.raises(TypeError, match="surprise"):
        ConditionConfig(surprise=1)
    with pytest.raises(ValueError, match="max_followed"):
        ConditionConfig(max_followed=-1)
    with pytest.raises(ValueError, match="max_interests"):
        MultiInterestConfig(**SIZES, max_interests=0)
    with pytest.raises(ValueError, match="condition_share"):
        MultiInterestConfig(**SIZES, condition_share=1.5)


def test_a_bundle_rebuilds_the_multi_interest_model_for_serving(tmp_path):
    shop = generate_shop("tiny", seed=0)
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    model = MultiInterestModel(MultiInterestConfig(**space.sizes, dim=16)).eval()
    path = write_bundle(tmp_path, "mi1", space, items_table(shop.catalog, space, np.ones(space.n_items + 1)), model,
                        MultiTaskRanker(RankerConfig(**space.sizes)), {}, "snap", {})
    loaded = load_bundle(path).two_tower()
    assert isinstance(loaded, MultiInterestModel) and hasattr(loaded, "user_interests")
    batch = _history()
    torch.testing.assert_close(loaded.user_interests(*batch)[0], model.user_interests(*batch)[0])
    items = torch.arange(1, 9)
    torch.testing.assert_close(loaded.item_tower_by_index(items), model.item_tower_by_index(items))


def test_a_logged_condition_teaches_its_query_what_users_engaged_with_under_it(one_thread):
    """A third of the examples were served under condition "category 3" (a promotion page, say) and engaged with
    items 1-5 (category 1). Learnt from the logged triples, that condition's query finds items 1-5; learnt from the
    target's category alone (the same examples, no condition logged), it finds category 3 as before."""
    data = _two_interest_data()
    promoted = np.arange(len(data["target"])) % 3 == 0
    data["target"] = np.where(promoted, 1 + np.arange(len(promoted)) % 5, data["target"])
    data["item_counts"] = np.bincount(data["target"], minlength=61)
    inputs = ("hist_items", "hist_actions", "hist_ages", "context", "target", "condition")
    share = {}
    for name, condition in (("logged", np.where(promoted, 3, 0)), ("unlogged", np.zeros(len(promoted), np.int64))):
        model = _fit(data | {"condition": condition.astype(np.int64)}, inputs)
        with torch.no_grad():
            q = model.condition_tower(*(torch.from_numpy(data[k][:60]) for k in inputs[:4]),
                                      torch.full((60,), 3)).numpy()
        scores = q @ item_vectors(model).T
        scores[:, 0] = -np.inf
        top = np.argsort(-scores, axis=1)[:, :5]
        share[name] = float((top <= 5).mean())
    assert share["logged"] > 0.6 and share["unlogged"] < 0.2, share
