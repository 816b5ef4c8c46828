"""Harness adapters of the neural retrieval models: training arrays, fit specs and exact full-catalog ranking.

`fit` itself runs on Ray Train (covered by tests/integration); here the same model is trained in process on the
adapter's own arrays and spec, so the ranking is that of a real, trained model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import recall_at_k
from training.data.splits import leave_last_out
from training.fit.retrieval import InBatchTwoTower, SASRecRetrieval, SeedTwoTowerRetrieval, sasrec_data, tower_data
from training.fit.train_loop import MIN_BATCH_SIZE, MIN_STEPS_PER_EPOCH, batch_size_for
from training.fit.retrieval import LightGCNRetrieval, MultiInterestRetrieval, SASRecGBCE, SASRecSampled, graph_edges
from training.models.multi_interest import MultiInterestConfig, MultiInterestModel
from training.models.sasrec import SEQUENCE_INPUTS
from training.data.synthetic import generate_shop
from training.fit.train_loop import TrainConfig, build_model
from training.models.two_tower import TOWER_INPUTS




@pytest.fixture(scope="module")
def task():
    return leave_last_out(generate_shop("tiny", 0), max_users=200, dataset="synthetic-tiny")


def _train_in_process(adapter, task, steps: int = 40) -> None:
    """The Ray Train loop's steps on one process: prepare, Adam, shuffled batches of the adapter's arrays."""
    data = adapter.training_data(task)
    spec = adapter.fit_spec(task, TrainConfig(dim=32))
    torch.manual_seed(0)
    model = build_model(spec.model, spec.model_config)
    model.prepare(data)
    opt = torch.optim.Adam(model.parameters(), lr=spec.lr)
    n = len(data[spec.inputs[0]])
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, n, size=min(spec.batch_size, n))
        loss = model(*(torch.from_numpy(data[k][idx]) for k in spec.inputs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    adapter.model = model.eval()


def test_tower_data_keeps_first_engagements_only_and_counts_targets(task):
    data = tower_data(task)
    n = len(data["target"])
    assert all(len(data[k]) == n for k in TOWER_INPUTS) and n > 1000
    assert (data["target"] > 0).all()
    raw = tower_data(task, drop_repeats=False)
    assert len(raw["target"]) > n  # the shop has click -> cart -> purchase runs on one item
    np.testing.assert_array_equal(data["item_counts"], np.bincount(data["target"], minlength=task.space.n_items + 1))
    assert all(len(data[k]) == task.space.n_items + 1 for k in ("item_brand", "item_category", "item_price"))


def test_sasrec_data_targets_are_new_items_for_their_user(task):
    data = sasrec_data(task)
    assert data["seq_items"].shape == data["seq_targets"].shape
    assert data["seq_items"].shape[1] == task.space.history_len
    t = data["seq_targets"]
    assert (t > 0).sum() > 1000
    rows, cols = np.nonzero(t)
    for r, c in zip(rows[:200], cols[:200]):
        assert t[r, c] not in data["seq_items"][r, :c + 1]  # never a repeat of an item earlier in the window


def test_fit_spec_carries_the_model_class_config_and_schedule(task):
    spec = SeedTwoTowerRetrieval(user_encoder="attention", epochs=2).fit_spec(task, TrainConfig(dim=16))
    assert spec.model == "training.models.two_tower:SeedTwoTower"
    assert spec.model_config["user_encoder"] == "attention" and spec.model_config["dim"] == 16
    assert spec.model_config["n_items"] == task.space.n_items + 1
    assert spec.inputs == TOWER_INPUTS and spec.epochs == 2
    sas = SASRecRetrieval().fit_spec(task, TrainConfig())
    assert sas.model == "training.models.sasrec:SASRec" and sas.inputs == SEQUENCE_INPUTS and sas.batch_size == 128
    assert InBatchTwoTower().fit_spec(task, TrainConfig()).model == "training.models.two_tower:TwoTower"


def test_large_data_keeps_the_configured_batch_size():
    enough = 1024 * 2 * MIN_STEPS_PER_EPOCH
    assert batch_size_for(enough, 2, 1024) == 1024
    assert batch_size_for(84_074, 2, 1024) == 1024  # the demo shop's leave-last-out examples: unchanged
    assert batch_size_for(enough - 2 * MIN_STEPS_PER_EPOCH, 2, 1024) == 1023


@pytest.mark.parametrize("n", [6_801, 20_000, 50_000])
@pytest.mark.parametrize("workers", [1, 2, 4])
def test_small_data_shrinks_the_batch_so_an_epoch_has_the_minimum_steps(n, workers):
    b = batch_size_for(n, workers, 1024)
    assert MIN_BATCH_SIZE <= b <= 1024
    assert n // (b * workers) >= MIN_STEPS_PER_EPOCH  # the train loop's steps per epoch


def test_tiny_data_stops_at_the_batch_floor_and_never_raises_a_small_batch():
    assert batch_size_for(500, 2, 1024) == MIN_BATCH_SIZE
    assert batch_size_for(500, 2, 1024, min_batch=16) == 16
    assert batch_size_for(500, 2, 8) == 8  # a configured batch below the floor stays


def test_fit_spec_shrinks_only_a_batch_size_the_caller_did_not_give(task):
    cfg = TrainConfig(num_workers=2, tower_batch_size=1024)
    assert SeedTwoTowerRetrieval().fit_spec(task, cfg, n_examples=8_000).batch_size == 100
    assert SeedTwoTowerRetrieval().fit_spec(task, cfg).batch_size == 1024  # no example count: as configured
    assert SeedTwoTowerRetrieval(batch_size=512).fit_spec(task, cfg, n_examples=8_000).batch_size == 512
    assert SASRecRetrieval().fit_spec(task, cfg, n_examples=1_311).batch_size == 16  # windows: its own floor


@pytest.mark.parametrize("adapter", [SeedTwoTowerRetrieval(), SeedTwoTowerRetrieval(user_encoder="attention"),
                                     InBatchTwoTower(), SASRecRetrieval(), SASRecSampled(), SASRecGBCE(),
                                     LightGCNRetrieval(), MultiInterestRetrieval()],
                         ids=["seed_transformer", "seed_attention", "in_batch", "sasrec", "sasrec_sampled",
                              "sasrec_gbce", "lightgcn", "multi_interest"])
def test_every_parameter_gets_a_gradient_on_every_batch(task, adapter):
    """DDP (find_unused_parameters=False) fails on the next step when a parameter got no gradient on some rank."""
    data = adapter.training_data(task)
    spec = adapter.fit_spec(task, TrainConfig(dim=16), n_examples=len(data[adapter.inputs[0]]))
    torch.manual_seed(0)
    model = build_model(spec.model, spec.model_config)
    model.prepare(data)
    rng = np.random.default_rng(0)
    for b in (1, 2, spec.batch_size, 3 * spec.batch_size):
        idx = rng.integers(0, len(data[spec.inputs[0]]), size=b)
        model.zero_grad(set_to_none=True)
        loss = model(*(torch.from_numpy(data[k][idx]) for k in spec.inputs))
        loss.backward()
        assert torch.isfinite(loss)
        assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_sasrec_variants_fix_their_loss_and_the_default_takes_the_full_softmax_on_small_catalogs(task):
    assert SASRecRetrieval().fit_spec(task, TrainConfig()).model_config["loss"] == "auto"
    assert SASRecSampled().fit_spec(task, TrainConfig()).model_config["loss"] == "sampled"
    assert SASRecGBCE().fit_spec(task, TrainConfig()).model_config["loss"] == "gbce"
    assert SASRecGBCE(loss="full").model_config["loss"] == "full"  # a constructor argument still wins


def test_graph_edges_are_the_distinct_engaged_pairs_of_the_training_events(task):
    edges = graph_edges(task)
    pairs = set(zip(edges["graph_user"].tolist(), edges["graph_item"].tolist()))
    assert len(pairs) == len(edges["graph_user"]) > 1000 and min(edges["graph_item"]) >= 1
    data = tower_data(task)  # every first engagement the towers learn from is an edge of the graph
    assert np.isin(np.unique(data["target"]), edges["graph_item"]).all()


def test_unknown_model_config_keys_are_named():
    with pytest.raises(ValueError, match="n_layer"):
        SeedTwoTowerRetrieval(n_layer=2)


def test_recommend_before_fit_is_an_error(task):
    with pytest.raises(RuntimeError, match="fit"):
        InBatchTwoTower().recommend(task, 10)


@pytest.mark.parametrize("adapter", [SeedTwoTowerRetrieval(batch_size=256), SASRecRetrieval(batch_size=64),
                                     LightGCNRetrieval(batch_size=256)],
                         ids=["seed_two_tower", "sasrec", "lightgcn"])
def test_recommend_ranks_the_catalog_exactly_without_seen_items(task, adapter):
    _train_in_process(adapter, task)
    k = 100
    ranked = adapter.recommend(task, k)
    assert ranked.shape == (len(task.user_ids), k) and ranked.dtype == np.int64
    assert (ranked > 0).all()  # 2,000 items: always k eligible ones
    for row, seen in zip(ranked, task.seen):
        assert not np.isin(row, seen).any()
        assert len(np.unique(row)) == k
    # Exact: the first user's list is the brute-force top-k of the dot products among unseen items.
    with torch.no_grad():
        u = adapter.model.user_tower(*(torch.from_numpy(a) for a in task.user_inputs(slice(0, 1))))
        scores = (u @ adapter.model.item_tower_by_index(torch.arange(task.space.n_items + 1)).T)[0].numpy()
    scores[0] = -np.inf
    scores[task.seen[0]] = -np.inf
    np.testing.assert_array_equal(np.sort(ranked[0]), np.sort(np.argsort(-scores, kind="stable")[:k]))
    # Trained, it finds held-out items far above chance (k / n_items = 0.05; 40 steps reach ~0.55).
    assert recall_at_k(ranked, task.targets, k) > 0.3


def test_harness_adapter_returns_k_distinct_unseen_items_with_reasons():
    from training.data.splits import leave_last_out

    task = leave_last_out(generate_shop("tiny", seed=0), max_users=40)
    torch.manual_seed(0)
    model = MultiInterestModel(MultiInterestConfig(**task.space.sizes, dim=16)).eval()
    f = task.item_features
    model.items.set_item_features(*(torch.from_numpy(a) for a in (f.brand_idx, f.category_idx, f.price_bucket)))
    adapter = MultiInterestRetrieval()
    adapter.model = model
    ranked, reasons = adapter.recommend_with_reasons(task, 50)
    assert ranked.shape == (40, 50)
    for row, why, seen in zip(ranked, reasons, task.seen):
        items = row[row > 0]
        assert len(items) == 50 == len(why) and len(set(items.tolist())) == 50
        assert not np.isin(items, seen).any()
        assert all(r.startswith(("interest:", "condition:category=")) for r in why)
    used = adapter.interests(task)
    assert used.shape == (40,) and used.min() >= 1 and used.max() <= 4


def test_harness_adapter_shrinks_the_configured_batch_on_small_data_only(monkeypatch):
    """Same rule as the seed model (`batch_size_for`): a small shop still gets enough optimiser steps per epoch."""
    import training.fit.retrieval as retrieval
    import training.fit.train_loop as train_loop
    from training.data.splits import leave_last_out
    from training.fit.retrieval import tower_data
    from training.fit.train_loop import batch_size_for

    task = leave_last_out(generate_shop("tiny", seed=0), max_users=40)
    specs = []

    def fake_fit_on_ray(spec, data, cfg, run_name):
        specs.append(spec)
        model = train_loop.build_model(spec.model, spec.model_config)
        return model.state_dict(), [{"epoch": 1, "loss": 0.0, "examples_per_s": 1.0}]

    monkeypatch.setattr(retrieval, "fit_on_ray", fake_fit_on_ray)
    cfg = train_loop.TrainConfig(num_workers=2, tower_batch_size=1024, dim=16)
    info = MultiInterestRetrieval().fit(task, cfg)
    n = len(tower_data(task)["target"])
    assert specs[-1].batch_size == info["batch_size"] == batch_size_for(n, 2, 1024) < 1024
    MultiInterestRetrieval(batch_size=512).fit(task, cfg)
    assert specs[-1].batch_size == 512  # given explicitly: used as is


def test_search_grid_takes_the_keys_a_model_has_and_bounds_the_combinations():
    from training.fit.retrieval import MAX_SEARCH, search_grid

    grid, skipped = search_grid({"lr": [1e-3, 3e-3], "dropout": [0.1, 0.3], "n_interests": [2]}, {"dropout", "dim"})
    assert grid == [{"lr": 1e-3, "dropout": 0.1}, {"lr": 1e-3, "dropout": 0.3}, {"lr": 3e-3, "dropout": 0.1},
                    {"lr": 3e-3, "dropout": 0.3}] and skipped == ["n_interests"]
    assert search_grid({}, {"dim"}) == ([], [])
    with pytest.raises(ValueError, match="non-empty list"):
        search_grid({"lr": []}, set())
    with pytest.raises(ValueError, match=f"at most {MAX_SEARCH}"):
        search_grid({"lr": list(range(5)), "dim": list(range(4))}, {"dim"})


def test_a_search_fits_every_combination_and_keeps_the_best_validation_score(monkeypatch, task):
    """Ray Train replaced by a stand-in whose validation score is known per learning rate: the adapter must keep
    the model of the best one and report every run."""
    import training.fit.retrieval as retrieval

    score = {1e-3: 0.10, 3e-3: 0.25, 1e-2: 0.05}
    seen = []

    def fake_fit_on_ray(spec, data, cfg, run_name):
        seen.append((spec.lr, spec.model_config["dropout"], run_name))
        model = build_model(spec.model, spec.model_config)
        torch.nn.init.constant_(model.items.item.weight, spec.lr)  # marks which run this state came from
        return model.state_dict(), [{"epoch": 1, "loss": 0.0, "examples_per_s": 1.0, "val_ndcg@10": score[spec.lr],
                                     "val_recall@100": 0.5, "best_epoch": 1}]

    monkeypatch.setattr(retrieval, "fit_on_ray", fake_fit_on_ray)
    cfg = TrainConfig(dim=8, val_users=100, search={"lr": [1e-3, 3e-3, 1e-2], "dropout": [0.2], "gamma": [1]})
    adapter = SASRecRetrieval(run_name="searched")
    info = adapter.fit(task, cfg)
    assert [(lr, d) for lr, d, _ in seen] == [(1e-3, 0.2), (3e-3, 0.2), (1e-2, 0.2)]
    assert len({name for *_, name in seen}) == 3  # one Ray Train run each: none resumes another's checkpoint
    assert info["search"]["chosen"] == {"lr": 3e-3, "dropout": 0.2} and info["search"]["skipped_keys"] == ["gamma"]
    assert [r["val_ndcg@10"] for r in info["search"]["runs"]] == [0.10, 0.25, 0.05]
    assert info["validation"]["val_ndcg@10"] == 0.25
    assert torch.allclose(adapter.model.items.item.weight, torch.tensor(3e-3))  # the kept model is the best run's
    assert adapter.lr is None and adapter.model_config == {}  # the search does not change the adapter itself


def test_parse_search_reads_the_command_line_form():
    from training.evaluation.harness import parse_search

    assert parse_search("lr=0.001,0.003; dropout=0.1 ;dim=32,64") == {"lr": [0.001, 0.003], "dropout": [0.1],
                                                                      "dim": [32, 64]}
    with pytest.raises(ValueError, match="--search"):
        parse_search("lr")



def test_the_multi_interest_examples_carry_the_condition_logged_for_their_engagement(task):
    """A triple gives its category to the example whose user, item and time are its engagement's; a triple of an
    unknown user, of another time or of an unknown category gives none."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from training.data.impressions import CONDITIONS_SCHEMA

    adapter = MultiInterestRetrieval()
    assert (adapter.training_data(task)["condition"] == 0).all()  # no served log: nothing logged
    # clicks on items the user engaged with only once: each is an example of its own (no repeat drops it)
    engaged = task.train_events.filter(pc.is_in(task.train_events["action"],
                                                pa.array(["click", "wishlist", "add_to_cart", "purchase"])))
    pairs = list(zip(engaged["user_id"].to_pylist(), engaged["item_id"].to_pylist()))
    once = {p for p in pairs if pairs.count(p) == 1} if len(pairs) < 50_000 else set()
    clicks = [(u, i, t) for (u, i), a, t in zip(pairs, engaged["action"].to_pylist(), engaged["timestamp"].to_pylist())
              if a == "click" and (u, i) in once][:40]
    categories = task.space.categories
    rows = [{"user_id": u, "item_id": i, "timestamp": t, "category": categories[r % len(categories)]}
            for r, (u, i, t) in enumerate(clicks)]
    stray = [dict(rows[0], user_id="nobody"), dict(rows[1], category="no-such-category"),
             dict(rows[2], timestamp=rows[2]["timestamp"].replace(year=2001))]
    adapter.logged_conditions = pa.Table.from_pylist(rows + stray, schema=CONDITIONS_SCHEMA)
    data = adapter.training_data(task)
    assert len(rows) == 40 and adapter.condition_examples == len(rows)
    got = sorted(data["condition"][data["condition"] > 0].tolist())
    assert got == sorted(task.space.lookup("categories", [r["category"] for r in rows]).tolist())
