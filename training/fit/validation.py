"""Validation for the neural models: a split of the training events, a score per epoch, and early stopping.

A model is trained to convergence, not for a fixed number of epochs: the epoch budget (`TrainConfig.tower_epochs`)
is an upper bound. Every neural retrieval model holds a validation split out of its task's *training* events with
the task's own protocol, one step earlier (SASRec's protocol, Kang & McAuley 2018):

- leave-last-out: each user's last first-time engagement is the test target; the one before it (the next-to-last)
  is the validation target, and the model learns from the events before it;
- temporal: the newest `test_fraction` of the training events is the validation slice.

After each epoch rank 0 ranks the whole catalog for the validation users (seen items excluded, exactly as the
harness does for the test users) and reports NDCG@10 and Recall@100; training stops once NDCG@10 has not improved
for `patience` epochs, and the weights of the best epoch are the ones kept. At test time the user's history holds
the validation item again: only the weights were chosen on it.

`EarlyStopping` is plain Python (no Ray, no torch) and `ranking_validation` plain torch/NumPy, so both unit-test alone;
`training.fit.train_loop` calls them from the Ray Train workers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from training.data.schemas import Shop
from training.data.splits import RetrievalTask, leave_last_out, temporal
from training.metrics import per_user_at_k, top_k_excluding

VAL_PREFIX = "val_"  # keys of the validation arrays in a fit's data dict; the batches never read them
VAL_METRIC = "val_ndcg@10"  # what early stopping watches (higher is better)
VAL_INPUTS = ("hist_items", "hist_actions", "hist_ages", "context")  # the user tower's inputs, in order
_SCORE_CELLS = 1 << 22  # users x items per scoring chunk on the worker (16 MB of float32)


def validation_task(task: RetrievalTask, max_users: int, seed: int, test_fraction: float) -> RetrievalTask | None:
    """The task's protocol applied again to its own training events, with its vocabulary; None without users.

    Args:
        task: the task whose test targets the model must never see.
        max_users: validation users (a seeded sample): the per-epoch score costs one catalog ranking per user.
        seed: the sample's seed.
        test_fraction: the temporal protocol's share of (training) events held out.
    """
    shop = Shop(catalog=task.catalog, users=task.users, events=task.train_events, meta={}, hidden=task.hidden)
    if task.protocol == "leave_last_out":
        val = leave_last_out(shop, max_users=max_users, seed=seed, history_len=task.space.history_len,
                             dataset=task.dataset, space=task.space)
    elif task.protocol == "temporal":
        val = temporal(shop, test_fraction=test_fraction, max_users=max_users, seed=seed,
                       history_len=task.space.history_len, dataset=task.dataset, space=task.space)
    else:
        raise ValueError(f"no validation split for protocol {task.protocol!r}")
    return val if val.user_ids else None


def _csr(rows: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    ptr = np.zeros(len(rows) + 1, dtype=np.int64)
    ptr[1:] = np.cumsum([len(r) for r in rows])
    flat = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, dtype=np.int64)
    return ptr, flat


def validation_arrays(val: RetrievalTask) -> dict[str, np.ndarray]:
    """The validation users' inputs, targets and seen items as flat arrays for the object store (`VAL_PREFIX` keys)."""
    out = {VAL_PREFIX + name: np.ascontiguousarray(a) for name, a in zip(VAL_INPUTS, val.user_inputs())}
    out[VAL_PREFIX + "target_ptr"], out[VAL_PREFIX + "targets"] = _csr(val.targets)
    out[VAL_PREFIX + "seen_ptr"], out[VAL_PREFIX + "seen"] = _csr(val.seen)
    return out


def has_validation(data: dict) -> bool:
    return VAL_PREFIX + "hist_items" in data


def _rows(ptr: np.ndarray, flat: np.ndarray, lo: int, hi: int) -> list[np.ndarray]:
    return [flat[ptr[i]:ptr[i + 1]] for i in range(lo, hi)]


@torch.inference_mode()
def ranking_validation(model: torch.nn.Module, data: dict[str, np.ndarray], device: torch.device | str = "cpu",
                       depth: int = 100) -> dict[str, float]:
    """NDCG@10 and Recall@100 of the model's full-catalog ranking for the validation users, seen items excluded.

    The model needs `user_tower(*VAL_INPUTS)`, `item_tower_by_index(items)` and `config.n_items`; the caller puts it
    in eval mode. Scores are the dot products the harness and serving rank by.
    """
    n_items = model.config.n_items
    V = torch.cat([model.item_tower_by_index(chunk.to(device)) for chunk in torch.arange(n_items).split(65536)])
    users = [data[VAL_PREFIX + k] for k in VAL_INPUTS]
    n = len(users[0])
    step = max(1, _SCORE_CELLS // n_items)
    ndcg, recall = [], []
    for s in range(0, n, step):
        e = min(s + step, n)
        U = model.user_tower(*(torch.tensor(a[s:e], device=device) for a in users))  # copies: store arrays are read-only
        scores = (U @ V.T).float().cpu().numpy()
        seen = _rows(data[VAL_PREFIX + "seen_ptr"], data[VAL_PREFIX + "seen"], s, e)
        targets = _rows(data[VAL_PREFIX + "target_ptr"], data[VAL_PREFIX + "targets"], s, e)
        ranked = top_k_excluding(scores, depth, seen)
        ndcg.append(per_user_at_k(ranked, targets, 10)["ndcg"])
        recall.append(per_user_at_k(ranked, targets, depth)["recall"])
    return {VAL_METRIC: float(np.nanmean(np.concatenate(ndcg))) if n else float("nan"),
            f"val_recall@{depth}": float(np.nanmean(np.concatenate(recall))) if n else float("nan")}


@dataclass
class EarlyStopping:
    """Stops after `patience` epochs without a better score (higher is better, by at least `min_delta`).

    patience 0 never stops early: the budget is the schedule, and the best epoch is still tracked and kept.
    """

    patience: int
    min_delta: float = 1e-4
    best: float = -float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, score: float) -> bool:
        """Records one epoch's score; True when it is the new best (its weights are the ones to keep)."""
        if np.isfinite(score) and score > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = float(score), epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def to_dict(self) -> dict:
        return asdict(self)


def training_summary(history: list[dict], budget: int, patience: int) -> dict:
    """What the report says about one fit: epochs run, best validation score and epoch, and why it stopped.

    "stopped" is "early" (patience ran out: the best epoch lies before the last), "budget" (the last epoch of the
    budget ran while the score was still improving within patience: the model may not have converged, and
    `warning` says so), or "no validation" (no validation users: the budget was the schedule).
    """
    scored = [h for h in history if h.get(VAL_METRIC) is not None and np.isfinite(h[VAL_METRIC])]
    epochs = int(max((h.get("epoch", 0) for h in history), default=0))
    if not scored:
        return {"epochs_run": epochs, "budget": budget, "patience": patience, "stopped": "no validation",
                "best_epoch": epochs, VAL_METRIC: None, "warning": None}
    kept = history[-1].get("best_epoch")  # the epoch whose weights the loop kept (EarlyStopping's min_delta)
    best = next((h for h in scored if h["epoch"] == kept), None) or max(scored, key=lambda h: h[VAL_METRIC])
    best_epoch = int(best["epoch"])
    # Converged: patience ran out, before the budget or exactly at its last epoch.
    converged = epochs < budget or (patience > 0 and epochs - best_epoch >= patience)
    warning = None if converged else (
        f"stopped at its budget of {budget} epochs, not at its best: validation {VAL_METRIC} "
        + ("was still improving at the last epoch" if best_epoch == epochs else f"peaked at epoch {best_epoch}, "
           f"fewer than patience={patience} epochs before the end") + "; raise the epoch budget")
    return {"epochs_run": epochs, "budget": budget, "patience": patience,
            "stopped": "early" if converged else "budget", "best_epoch": best_epoch,
            VAL_METRIC: float(best[VAL_METRIC]),
            "val_recall@100": float(best["val_recall@100"]) if best.get("val_recall@100") is not None else None,
            "curve": [[int(h["epoch"]), float(h[VAL_METRIC])] for h in scored], "warning": warning}
