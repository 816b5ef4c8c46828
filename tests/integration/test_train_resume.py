"""Ray Train resume: fitting a run name again continues after its last checkpoint instead of starting over.

Ray Train V2 (the default in Ray 2.60) keeps a checkpoint-manager snapshot under `storage_path/<run name>/`; a new
`TorchTrainer` with the same `RunConfig(name, storage_path)` reloads it and hands the latest checkpoint to the
workers through `ray.train.get_checkpoint()`, from which `training.fit.train_loop` restores weights, optimiser and epoch.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tower_inputs():
    from training.data.splits import leave_last_out
    from training.fit.retrieval import InBatchTwoTower, tower_data
    from training.data.synthetic import generate_shop
    from training.fit.train_loop import TrainConfig

    task = leave_last_out(generate_shop("tiny", 0), max_users=50, dataset="synthetic-tiny")
    cfg = TrainConfig(num_workers=1, dim=16, progress=False)
    # The foundation two-tower draws no random numbers in forward, so an interrupted-then-resumed run can be
    # compared bit for bit with an uninterrupted one.
    spec = InBatchTwoTower(epochs=1, batch_size=256).fit_spec(task, cfg)
    return spec, tower_data(task), cfg


def test_a_second_fit_of_the_same_run_resumes_after_the_last_checkpoint(ray_cluster, tmp_path, tower_inputs):
    from training.fit.train_loop import fit_on_ray

    spec, data, cfg = tower_inputs
    cfg = dataclasses.replace(cfg, storage_path=str(tmp_path / "runs"))
    _, first = fit_on_ray(spec, data, cfg, "resume-me")  # stops after epoch 1, as if interrupted there
    state, resumed = fit_on_ray(dataclasses.replace(spec, epochs=2), data, cfg, "resume-me")
    assert [int(r["epoch"]) for r in first] == [1]
    assert [int(r["epoch"]) for r in resumed] == [1, 2]
    # Epoch 1's row is the restored checkpoint's report (same wall time to the last digit), not a rerun.
    assert resumed[0]["seconds"] == first[0]["seconds"]
    assert resumed[1]["seconds"] != first[0]["seconds"]

    full_state, full = fit_on_ray(dataclasses.replace(spec, epochs=2), data, cfg, "uninterrupted")
    assert [int(r["epoch"]) for r in full] == [1, 2]
    assert full[0]["seconds"] != first[0]["seconds"]
    # Resuming restored weights, optimiser state and epoch: the result equals the uninterrupted run's.
    assert state.keys() == full_state.keys()
    for name in full_state:
        torch.testing.assert_close(state[name], full_state[name], rtol=0, atol=0, msg=name)


def test_a_validated_fit_stops_early_and_keeps_its_best_epoch(ray_cluster, tmp_path):
    """A budget far above convergence: training stops `patience` epochs after its best validation score, and the
    model it returns scores that best epoch's figure on the validation users again."""
    from training.data.splits import leave_last_out
    from training.data.synthetic import generate_shop
    from training.fit.retrieval import InBatchTwoTower
    from training.fit.train_loop import TrainConfig
    from training.fit.validation import VAL_METRIC, ranking_validation, validation_arrays, validation_task

    task = leave_last_out(generate_shop("tiny", 0), max_users=100, dataset="synthetic-tiny")
    cfg = TrainConfig(num_workers=2, cpus_per_worker=0.25, dim=16, progress=False, patience=2, val_users=300,
                      storage_path=str(tmp_path / "runs"))
    adapter = InBatchTwoTower(epochs=60, lr=0.02)
    info = adapter.fit(task, cfg)
    v = info["validation"]
    assert v["stopped"] == "early" and v["warning"] is None
    assert v["epochs_run"] == v["best_epoch"] + 2 < 60  # patience 2: two epochs without a better score
    assert [int(h["epoch"]) for h in info["history"]] == list(range(1, v["epochs_run"] + 1))
    kept = next(h[VAL_METRIC] for h in info["history"] if h["epoch"] == v["best_epoch"])
    assert v[VAL_METRIC] == kept >= max(h[VAL_METRIC] for h in info["history"]) - 1e-4  # EarlyStopping.min_delta
    val = validation_task(task, cfg.val_users, cfg.seed, cfg.test_fraction)
    assert ranking_validation(adapter.model, validation_arrays(val))[VAL_METRIC] == pytest.approx(kept, abs=1e-6)
