"""Neural retrieval models behind the evaluation harness's RetrievalModel protocol (`training.harness`).

Each adapter builds its training arrays from `task.train_events` only, trains on Ray Train through
`training.train_loop.fit_on_ray` (the caller has initialised Ray), and ranks the whole catalog exactly for every
evaluated user (chunked matrix product), never returning an item in `task.seen`.

- `InBatchTwoTower`: the foundation `TwoTower` (mean pooling, in-batch softmax + logQ).
- `SeedTwoTowerRetrieval`: seed 000, `SeedTwoTower` (transformer user tower, log-uniform sampled softmax + logQ).
- `SASRecRetrieval`: `SASRec`, causal self-attention over the engagement sequence, next-item prediction.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import fields

import numpy as np
import torch

from training.examples import tower_examples
from training.features import engagements_of
from training.protocols import RetrievalTask
from training.retrieval_baselines import recommend_by_chunks
from training.sasrec import SEQUENCE_INPUTS, SASRecConfig, sequence_windows
from training.train_loop import FitSpec, TrainConfig, build_model, fit_on_ray
from training.two_tower import TOWER_INPUTS, SeedTwoTowerConfig, TwoTowerConfig

# Small data needs small batches: every neural model here learns an id embedding per item, and on a small shop a
# 1024-row batch on 2 workers leaves ~3 optimiser steps per epoch (9 in all on a 10k-item, 6.8k-example shop): seed
# two-tower NDCG@10 0.002 under leave-last-out, against 0.11 for EASE. Steps, not passes over the data, were short:
# in the same 3 epochs a batch of 85 (40 steps per epoch) gave 0.12 and one of 64 gave 0.13, while 10 epochs at
# batch 256 gave 0.09 and 10 or 30 epochs at batch 128 overfit (0.07, 0.04). So the batch shrinks; epochs stay.
MIN_STEPS_PER_EPOCH = 40  # at 1024 rows x 2 workers, 82k+ examples keep their batch: the demo shop (84k-92k) does
MIN_BATCH_SIZE = 32  # floor (not tuned): tiny data gets fewer steps rather than batches of a few rows

TWO_TOWER_CLASS = "training.two_tower:TwoTower"
SEED_TWO_TOWER_CLASS = "training.two_tower:SeedTwoTower"
SASREC_CLASS = "training.sasrec:SASRec"


def item_lookups(task: RetrievalTask) -> dict[str, np.ndarray]:
    """(n_items + 1,) brand, category and price bucket by item index: the arrays every model's `prepare` reads."""
    f = task.item_features
    return {"item_brand": f.brand_idx, "item_category": f.category_idx, "item_price": f.price_bucket}


def tower_data(task: RetrievalTask, drop_repeats: bool = True) -> dict[str, np.ndarray]:
    """Two-tower training arrays (`TOWER_INPUTS`, lookups, `item_counts`) from the task's training events.

    With `drop_repeats`, only a user's first engagement with an item is an example (the purchase after the click
    is dropped): every protocol excludes seen items from the ranking, so learning to repeat them is wasted capacity.
    """
    ex = tower_examples(task.train_events, task.space, task.item_features.category_idx)
    keep = np.ones(len(ex), dtype=bool)
    if drop_repeats:
        order = np.argsort(ex.time_ms, kind="stable")
        pair = ex.user_code[order] * (task.space.n_items + 1) + ex.target[order]
        keep = np.zeros(len(ex), dtype=bool)
        keep[order[np.unique(pair, return_index=True)[1]]] = True  # np.unique returns each pair's first index
    data = {k: getattr(ex, k)[keep] for k in TOWER_INPUTS}
    counts = np.bincount(data["target"], minlength=task.space.n_items + 1)
    return data | item_lookups(task) | {"item_counts": counts}


def sasrec_data(task: RetrievalTask, length: int | None = None) -> dict[str, np.ndarray]:
    """SASRec windows (`SEQUENCE_INPUTS`), lookups and `item_counts` (target counts) from the training events."""
    windows = sequence_windows(engagements_of(task.train_events, task.space), length or task.space.history_len)
    targets = windows["seq_targets"]
    counts = np.bincount(targets[targets > 0], minlength=task.space.n_items + 1)
    return windows | item_lookups(task) | {"item_counts": counts}


def batch_size_for(n_examples: int, workers: int, batch_size: int, min_batch: int = MIN_BATCH_SIZE,
                   min_steps: int = MIN_STEPS_PER_EPOCH) -> int:
    """The per-worker batch size: `batch_size`, shrunk on small data so that an epoch has `min_steps` optimiser steps.

    Rule: b = min(batch_size, max(min_batch, n_examples // (workers * min_steps))). Large data keeps `batch_size`
    (the time per fit does not change); a smaller batch never goes below `min_batch` (nor below a `batch_size` that
    is already smaller), so tiny data sets get fewer steps rather than batches of a few rows. Epochs stay as
    configured: more passes over small data overfit (see `MIN_STEPS_PER_EPOCH`).
    """
    fit = n_examples // (max(workers, 1) * min_steps)
    return int(min(batch_size, max(min_batch, fit)))


def _config_fields(config_cls: type) -> set[str]:
    return {f.name for f in fields(config_cls)}


class _NeuralRetrieval:
    """Shared fit/recommend of the neural adapters; subclasses say which model, config and training arrays."""

    name = ""
    model_class = ""
    config_cls: type = TwoTowerConfig
    inputs: tuple[str, ...] = TOWER_INPUTS
    default_batch_size: int | None = None  # None: `TrainConfig.tower_batch_size`
    min_batch_size: int = MIN_BATCH_SIZE  # floor of the small-data batch rule (`batch_size_for`)

    def __init__(self, epochs: int | None = None, batch_size: int | None = None, lr: float | None = None,
                 run_name: str | None = None, **model_config) -> None:
        """Args:
            epochs, batch_size (per worker), lr: override `TrainConfig.tower_*` of the harness's config. A
                batch size given here is used as is; otherwise the configured one is shrunk on small data
                (`batch_size_for`).
            run_name: Ray Train run name; a run of that name under `cfg.storage_path` resumes from its last
                checkpoint. Default: a fresh name per fit, so a finished run is never resumed by accident.
            model_config: fields of the model's config dataclass (dim, temperature, ...); unknown keys are errors.
        """
        unknown = set(model_config) - _config_fields(self.config_cls)
        if unknown:
            raise ValueError(f"{self.name}: unknown model config keys {sorted(unknown)}; "
                             f"known: {sorted(_config_fields(self.config_cls))}")
        self.epochs, self.batch_size, self.lr, self.run_name = epochs, batch_size, lr, run_name
        self.model_config = model_config
        self.model: torch.nn.Module | None = None

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """The arrays `fit_on_ray` ships to the workers: `inputs`, item lookups and `item_counts`."""
        return tower_data(task)

    def fit_spec(self, task: RetrievalTask, cfg: TrainConfig, n_examples: int | None = None) -> FitSpec:
        """The model class, its config (table sizes from `task.space`, `cfg.dim`, overrides) and the schedule.

        With `n_examples` (rows of the training arrays), a batch size not given to the constructor follows
        `batch_size_for` on `cfg.num_workers` workers.
        """
        sizes = {k: v for k, v in task.space.sizes.items() if k in _config_fields(self.config_cls)}
        config = self.config_cls(**sizes, **({"dim": cfg.dim} | self.model_config))
        batch_size = self.batch_size or self.default_batch_size or cfg.tower_batch_size
        if self.batch_size is None and n_examples is not None:
            batch_size = batch_size_for(n_examples, cfg.num_workers, batch_size, self.min_batch_size)
        return FitSpec(self.model_class, config.to_dict(), self.inputs, self.epochs or cfg.tower_epochs,
                       batch_size, self.lr or cfg.tower_lr)

    def fit(self, task: RetrievalTask, cfg: TrainConfig) -> dict:
        """Trains on Ray Train; returns {"seconds", "examples_per_s" (last epoch), "examples", "batch_size",
        "history"}."""
        t0 = time.perf_counter()
        data = self.training_data(task)
        spec = self.fit_spec(task, cfg, n_examples=len(data[self.inputs[0]]))
        run_name = self.run_name or f"{self.name}-{task.dataset or 'data'}-{task.protocol}-{uuid.uuid4().hex[:8]}"
        state, history = fit_on_ray(spec, data, cfg, run_name)
        model = build_model(spec.model, spec.model_config)
        model.load_state_dict(state)
        self.model = model.eval()
        return {"seconds": time.perf_counter() - t0, "examples_per_s": float(history[-1]["examples_per_s"]),
                "examples": int(len(data[self.inputs[0]])), "batch_size": spec.batch_size, "history": history}

    @torch.inference_mode()
    def recommend(self, task: RetrievalTask, k: int) -> np.ndarray:
        """(n_users, k) int64 item indices best first by exact dot product over the whole catalog; seen excluded."""
        if self.model is None:
            raise RuntimeError(f"{self.name}: call fit(task, cfg) before recommend")
        V = self.model.item_tower_by_index(torch.arange(task.space.n_items + 1))  # (n_items + 1, D)

        def score_rows(rows: slice) -> np.ndarray:
            U = self.model.user_tower(*(torch.from_numpy(a) for a in task.user_inputs(rows)))  # (r, D)
            scores = U @ V.T  # (r, n_items + 1)
            scores[:, 0] = -torch.inf  # padding
            return scores.numpy()

        return recommend_by_chunks(task, k, score_rows)


class InBatchTwoTower(_NeuralRetrieval):
    """The foundation two-tower: mean-pooled history + context, in-batch softmax with logQ correction."""

    name = "two_tower_in_batch"
    model_class = TWO_TOWER_CLASS
    config_cls = TwoTowerConfig


class SeedTwoTowerRetrieval(_NeuralRetrieval):
    """Seed 000: transformer (or attention-pooling) user tower, log-uniform sampled softmax with logQ correction."""

    name = "two_tower"
    model_class = SEED_TWO_TOWER_CLASS
    config_cls = SeedTwoTowerConfig


class SASRecRetrieval(_NeuralRetrieval):
    """SASRec next-item model trained on windows of each user's engagement sequence."""

    name = "sasrec"
    model_class = SASREC_CLASS
    config_cls = SASRecConfig
    inputs = SEQUENCE_INPUTS
    default_batch_size = 128  # windows hold ~4 targets each on the demo shop: ~540 next-item targets per step
    min_batch_size = 16  # windows, not examples: 16 windows still hold ~60 next-item targets

    def training_data(self, task: RetrievalTask) -> dict[str, np.ndarray]:
        """Next-item windows of every user's training engagements."""
        return sasrec_data(task)
