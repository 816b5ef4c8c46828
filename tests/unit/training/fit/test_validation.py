"""Validation splits, per-epoch validation scores and early stopping (training/fit/validation.py), without Ray."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.features import engagements_of
from training.data.splits import leave_last_out, temporal
from training.data.synthetic import generate_shop
from training.fit.validation import (VAL_METRIC, EarlyStopping, has_validation, ranking_validation, training_summary,
                                     validation_arrays, validation_task)


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", 0)


def _pairs(task, events) -> set[tuple[str, int]]:
    eng = engagements_of(events, task.space)
    return {(eng.users[u], int(i)) for u, i in zip(eng.user_code, eng.item_idx)}


def test_leave_last_out_validation_holds_out_the_next_to_last_item_and_never_the_test_target(shop):
    task = leave_last_out(shop, max_users=150)
    val = validation_task(task, max_users=10_000, seed=0, test_fraction=0.1)
    assert val is not None and val.space is task.space and val.protocol == "leave_last_out"
    learnt = _pairs(task, val.train_events)
    test_targets = dict(zip(task.user_ids, (int(t[0]) for t in task.targets)))
    for user, target, seen in zip(val.user_ids, val.targets, val.seen):
        assert (user, int(target[0])) not in learnt  # the validation target is not in what the model learns from
        assert int(target[0]) not in set(seen.tolist())
        if user in test_targets:  # the test target is later still: never learnt, never the validation target
            assert (user, test_targets[user]) not in learnt and test_targets[user] != int(target[0])
    # The validation target is in the task's training events: the test history holds it again.
    assert all((u, int(t[0])) in _pairs(task, task.train_events) for u, t in zip(val.user_ids, val.targets))


def test_temporal_validation_is_the_newest_slice_of_the_training_events(shop):
    task = temporal(shop, test_fraction=0.2)
    val = validation_task(task, max_users=10_000, seed=0, test_fraction=0.2)
    train_ms = task.train_events.column("timestamp").cast("int64").to_numpy()
    val_ms = val.train_events.column("timestamp").cast("int64").to_numpy()
    assert val.train_events.num_rows < task.train_events.num_rows
    assert val_ms.max() < train_ms.max() and int(val.at_ms[0]) <= train_ms.max()


def test_validation_arrays_round_trip_targets_and_seen(shop):
    val = validation_task(leave_last_out(shop, max_users=100), 50, 0, 0.1)
    data = validation_arrays(val)
    assert has_validation(data) and len(data["val_hist_items"]) == len(val.user_ids) == 50
    for i in (0, 17, 49):
        np.testing.assert_array_equal(data["val_targets"][data["val_target_ptr"][i]:data["val_target_ptr"][i + 1]],
                                      val.targets[i])
        np.testing.assert_array_equal(data["val_seen"][data["val_seen_ptr"][i]:data["val_seen_ptr"][i + 1]],
                                      val.seen[i])


class _Oracle(torch.nn.Module):
    """Scores one item per user highest: the user's validation target (`hit`) or item 1 (a miss)."""

    def __init__(self, n_items: int, targets: np.ndarray, hit: bool) -> None:
        super().__init__()
        self.config = type("C", (), {"n_items": n_items})
        self.targets, self.hit, self.row = torch.as_tensor(targets), hit, 0  # row: next user, chunk by chunk

    def item_tower_by_index(self, item):
        return torch.nn.functional.one_hot(item, self.config.n_items).float()

    def user_tower(self, hist_items, hist_actions, hist_ages, context):
        n = len(hist_items)
        want = self.targets[self.row:self.row + n] if self.hit else torch.ones(n, dtype=torch.long)
        self.row += n
        return torch.nn.functional.one_hot(want, self.config.n_items).float()


def test_ranking_validation_scores_a_perfect_and_a_useless_model(shop):
    val = validation_task(leave_last_out(shop, max_users=100), 80, 0, 0.1)
    data = validation_arrays(val)
    first = np.array([t[0] for t in val.targets])
    perfect = _Oracle(val.space.n_items + 1, first, hit=True)
    assert ranking_validation(perfect, data)[VAL_METRIC] == pytest.approx(1.0)
    useless = _Oracle(val.space.n_items + 1, first, hit=False)
    out = ranking_validation(useless, data)
    assert out[VAL_METRIC] < 0.1 and 0.0 <= out["val_recall@100"] <= 1.0


def test_early_stopping_keeps_the_best_epoch_and_stops_after_patience():
    stop = EarlyStopping(patience=2)
    improved = [stop.update(e, s) for e, s in enumerate([0.1, 0.2, 0.19, 0.25, 0.24, 0.2], start=1)]
    assert improved == [True, True, False, True, False, False]
    assert stop.best_epoch == 4 and stop.best == 0.25 and stop.should_stop
    never = EarlyStopping(patience=0)
    for e in range(1, 10):
        never.update(e, 0.1)
    assert not never.should_stop and never.best_epoch == 1
    nan = EarlyStopping(patience=1)
    assert not nan.update(1, float("nan")) and nan.should_stop


def _history(scores):
    best, out = 0, []
    for e, s in enumerate(scores, start=1):
        best = e if s > max(scores[:e - 1], default=-1) else best
        out.append({"epoch": e, VAL_METRIC: s, "val_recall@100": s * 2, "best_epoch": best})
    return out


def test_training_summary_says_why_a_model_stopped():
    early = training_summary(_history([0.1, 0.3, 0.2, 0.2, 0.2]), budget=50, patience=3)
    assert early["stopped"] == "early" and early["best_epoch"] == 2 and early[VAL_METRIC] == 0.3
    assert early["warning"] is None and early["epochs_run"] == 5 and len(early["curve"]) == 5
    still_improving = training_summary(_history([0.1, 0.2, 0.3]), budget=3, patience=3)
    assert still_improving["stopped"] == "budget" and "still improving" in still_improving["warning"]
    exactly = training_summary(_history([0.1, 0.3, 0.2, 0.2, 0.2]), budget=5, patience=3)
    assert exactly["stopped"] == "early" and exactly["warning"] is None  # patience ran out at the last epoch
    peaked = training_summary(_history([0.1, 0.3, 0.2]), budget=3, patience=3)
    assert peaked["stopped"] == "budget" and "peaked at epoch 2" in peaked["warning"]
    none = training_summary([{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}], budget=2, patience=3)
    assert none["stopped"] == "no validation" and none["warning"] is None
