"""Harness adapters of the neural retrieval models: training arrays, fit specs and exact full-catalog ranking.

`fit` itself runs on Ray Train (covered by tests/integration); here the same model is trained in process on the
adapter's own arrays and spec, so the ranking is that of a real, trained model.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.metrics import recall_at_k
from training.protocols import leave_last_out
from training.retrieval_models import (InBatchTwoTower, SASRecRetrieval, SeedTwoTowerRetrieval, sasrec_data,
                                       tower_data)
from training.sasrec import SEQUENCE_INPUTS
from training.synthetic import generate_shop
from training.train_loop import TrainConfig, build_model
from training.two_tower import TOWER_INPUTS


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine torch's spinning thread pool slows small ops many times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert spec.model == "training.two_tower:SeedTwoTower"
    assert spec.model_config["user_encoder"] == "attention" and spec.model_config["dim"] == 16
    assert spec.model_config["n_items"] == task.space.n_items + 1
    assert spec.inputs == TOWER_INPUTS and spec.epochs == 2
    sas = SASRecRetrieval().fit_spec(task, TrainConfig())
    assert sas.model == "training.sasrec:SASRec" and sas.inputs == SEQUENCE_INPUTS and sas.batch_size == 128
    assert InBatchTwoTower().fit_spec(task, TrainConfig()).model == "training.two_tower:TwoTower"


def test_unknown_model_config_keys_are_named():
    with pytest.raises(ValueError, match="n_layer"):
        SeedTwoTowerRetrieval(n_layer=2)


def test_recommend_before_fit_is_an_error(task):
    with pytest.raises(RuntimeError, match="fit"):
        InBatchTwoTower().recommend(task, 10)


@pytest.mark.parametrize("adapter", [SeedTwoTowerRetrieval(batch_size=256), SASRecRetrieval(batch_size=64)],
                         ids=["seed_two_tower", "sasrec"])
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
