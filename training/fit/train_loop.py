"""Ray Train loops: data-parallel (DDP) training of the two-tower model and the ranker on N workers.

The loop is one function for every model: the worker gets the model class by name ("module:Class"), its config and
an object-store reference to the example arrays, takes its shard by rank, and reports loss and throughput each
epoch with a checkpoint (weights, optimiser state, epoch) from which an interrupted run resumes.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.fit.validation import VAL_METRIC, EarlyStopping, has_validation, ranking_validation

HEALTH_CHECK_INTERVAL_S = 0.25  # Ray Train's worker poll (its default 2 s), see fit_on_ray


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2  # data-parallel workers; 2 shows DDP on a laptop
    cpus_per_worker: float = 0.5  # fractional so training fits beside Serve replicas on a 2-core machine
    threads_per_worker: int = 1  # torch intra-op threads; 1 avoids oversubscribing the cores the workers share
    use_gpu: bool = False  # one GPU per worker when true; nothing else changes
    retrieval_model: str = "two_tower"  # the bundle's retrieval model: a name of RETRIEVAL_MODELS
    # The retrieval models' epoch budget: an upper bound, not the schedule. Each stops on its validation split once
    # NDCG@10 has not improved for `patience` epochs (small data sets need hundreds of steps per item); the demo
    # config sets 3 to fit its time budget, and its report says when a model stopped at the budget.
    tower_epochs: int = 50
    patience: int = 3  # epochs without a better validation NDCG@10 before a retrieval model stops; 0: run the budget
    val_users: int = 2000  # validation users ranked after every epoch (full catalog, like the test users)
    # A small search over validation: {key: [values]} of lr, batch_size, epochs or model config fields (dropout,
    # dim, ...); every neural model fits each combination of the keys it has and keeps the best validation NDCG@10
    search: dict = field(default_factory=dict)
    tower_batch_size: int = 1024  # per worker; also the number of in-batch negatives
    tower_lr: float = 3e-3
    ranker_epochs: int = 2
    ranker_batch_size: int = 2048
    ranker_lr: float = 3e-3
    ranker_max_impressions: int = 300_000  # a uniform sample of views bounds ranker time on big shops
    ranker_negatives_per_view: float = 1.0  # unshown items added as negatives per view (exposure bias)
    # Where those negatives come from: "retrieved" (uniformly among the version's retrieval top
    # `ranker_candidate_depth` for the view's user state: what a served list is made of) or "uniform" (the catalog).
    ranker_negatives: str = "retrieved"
    ranker_candidate_depth: int = 500  # as many as serving's candidates
    ranker_retrieval_feature: bool = True  # the ranker sees each candidate's retrieval score (training.fit.ranker_data)
    # Which logged views the ranker learns from: "all", or "served": only those of the shop's served period (a loop
    # shop's `served_from` on: the impressions the previous version served, `cluster/loop.py`)
    ranker_views: str = "all"
    # Where the ranker's item id table starts: "random", or "tower": the version's item-tower vectors projected to
    # the ranker's width (`ItemEmbedding.init_item_vectors`), so items few views show start near their neighbours
    ranker_item_init: str = "random"
    dim: int = 64
    history_len: int = 20
    test_fraction: float = 0.1  # the newest 10% of events are held out
    eval_users: int = 5000
    seed: int = 0
    storage_path: str = "runs"  # Ray Train checkpoints; must be shared storage on a multi-node cluster
    progress: bool = True  # a tqdm bar per epoch on rank 0

    def __post_init__(self) -> None:
        if self.ranker_negatives not in RANKER_NEGATIVES:
            raise ValueError(f"ranker_negatives must be one of {list(RANKER_NEGATIVES)}, got {self.ranker_negatives!r}")
        if self.ranker_views not in RANKER_VIEWS:
            raise ValueError(f"ranker_views must be one of {list(RANKER_VIEWS)}, got {self.ranker_views!r}")
        if self.ranker_item_init not in RANKER_ITEM_INIT:
            raise ValueError(f"ranker_item_init must be one of {list(RANKER_ITEM_INIT)}, got {self.ranker_item_init!r}")
        if self.ranker_candidate_depth < 1:
            raise ValueError(f"ranker_candidate_depth must be >= 1, got {self.ranker_candidate_depth}")

    def to_dict(self) -> dict:
        return asdict(self)


RANKER_NEGATIVES = ("retrieved", "uniform")
RANKER_VIEWS = ("all", "served")
RANKER_ITEM_INIT = ("random", "tower")


@dataclass(frozen=True)
class FitSpec:
    """What one `fit_on_ray` call trains: the model class, its config, and the optimisation schedule."""

    model: str  # "module:Class"; the class has `from_config(dict)`, optional `prepare(data)`, and forward -> loss
    model_config: dict
    inputs: tuple[str, ...]  # keys of the data arrays passed to forward, in order, one row per example
    epochs: int
    batch_size: int  # per worker
    lr: float


# Small data needs small batches: every neural model here learns an id embedding per item, and on a small shop a
# 1024-row batch on 2 workers leaves ~3 optimiser steps per epoch (9 in all on a 10k-item, 6.8k-example shop): seed
# two-tower NDCG@10 0.002 under leave-last-out, against 0.11 for EASE. Steps, not passes over the data, were short:
# in the same 3 epochs a batch of 85 (40 steps per epoch) gave 0.12 and one of 64 gave 0.13, while 10 epochs at
# batch 256 gave 0.09 and 10 or 30 epochs at batch 128 overfit (0.07, 0.04). So the batch shrinks; epochs stay.
MIN_STEPS_PER_EPOCH = 40  # at 1024 rows x 2 workers, 82k+ examples keep their batch: the demo shop (84k-92k) does
MIN_BATCH_SIZE = 32  # floor (not tuned): tiny data gets fewer steps rather than batches of a few rows

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


RANKER = "training.models.ranker:MultiTaskRanker"


def build_model(model: str, model_config: dict) -> torch.nn.Module:
    """Instantiates "module:Class" from its config dict (workers import the class by name)."""
    module, _, name = model.partition(":")
    if not module or not name:
        raise ValueError(f"model must be 'module:Class', got {model!r}")
    cls = getattr(importlib.import_module(module), name)
    return cls.from_config(model_config)


def _latest_checkpoint_state() -> tuple[dict | None, int]:
    """(state dicts, epochs done) from the run's latest checkpoint when Ray Train restores a run, else (None, 0)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None, 0
    with ckpt.as_directory() as d:
        if not (Path(d) / "state.pt").is_file():
            raise RuntimeError(f"the run's checkpoint {ckpt.path} was not written by this training loop (no "
                               "state.pt); train under another run name or storage path")
        saved = torch.load(Path(d) / "state.pt", weights_only=False)
    return saved, int(saved["epoch"])


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm  # [0] a bar the driver renders in place, not worker log lines

    epochs, batch_size, lr = config["epochs"], config["batch_size"], config["lr"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # same init on every rank; DDP also broadcasts rank 0's weights
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: dict[str, np.ndarray] = ray.get(config["data"])  # [1] every worker reads the arrays from the object store
    model = build_model(config["model"], config["model_config"])
    if hasattr(model, "prepare"):
        model.prepare(data)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    saved, start_epoch = _latest_checkpoint_state()  # [2] resume: weights, optimiser and epoch of the last report
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
    model = ray.train.torch.prepare_model(model)  # [3] DDP (gloo on CPU, nccl on GPU) and device placement
    torch.manual_seed(config["seed"] * 1009 + rank + 1)  # weights are in sync now; sampled negatives differ per rank
    device = ray.train.torch.get_device()
    inputs = config["inputs"]
    n = len(data[inputs[0]])
    steps = max(1, n // (batch_size * world))  # equal steps on every rank, or DDP waits on a missing all-reduce
    name = config["model"].rpartition(":")[2]
    validate = has_validation(data)
    stopper = EarlyStopping(config["patience"])
    best_state = None
    if saved is not None and "early_stopping" in saved:
        stopper = EarlyStopping(**saved["early_stopping"])
        best_state = saved.get("best_model")
    last: dict | None = saved.get("metrics") if saved is not None else None
    epoch = start_epoch
    while epoch < epochs and not (validate and stopper.should_stop):
        order = np.random.default_rng(config["seed"] + epoch).permutation(n)[rank::world]
        model.train()
        t0, total = time.perf_counter(), 0.0
        bar = (tqdm(total=steps, desc=f"{name} epoch {epoch + 1}/{epochs}", unit="step")
               if rank == 0 and config["progress"] else None)
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            batch = [torch.from_numpy(data[k][idx]).to(device) for k in inputs]
            loss = model(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        epoch += 1
        metrics = {"epoch": epoch, "loss": total / steps, "seconds": seconds,
                   "examples_per_s": steps * batch_size * world / seconds, "workers": world}
        inner = getattr(model, "module", model)
        if validate:
            metrics |= _validate(inner, data, device, rank, world)
            if stopper.update(epoch, metrics[VAL_METRIC]) and rank == 0:  # [5] the best epoch's weights are kept
                best_state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
            metrics |= {"best_epoch": stopper.best_epoch, "stop": stopper.should_stop}
        last = metrics
        if rank == 0:
            val = f" val NDCG@10 {metrics[VAL_METRIC]:.4f} (best epoch {stopper.best_epoch})" if validate else ""
            print(f"[{name}] epoch {epoch}/{epochs} loss {metrics['loss']:.4f} "
                  f"{metrics['examples_per_s']:,.0f} examples/s on {world} workers{val}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                torch.save({"model": inner.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                            "early_stopping": stopper.to_dict(), "best_model": best_state, "metrics": metrics},
                           Path(tmp) / "state.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [4] checkpoint
        else:
            ray.train.report(metrics)
    if epoch == start_epoch and saved is not None:  # a finished run resumed: report its last checkpoint once more
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(saved, Path(tmp) / "state.pt")
                ray.train.report(last or {"epoch": epoch}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(last or {"epoch": epoch})


def _validate(model: torch.nn.Module, data: dict, device, rank: int, world: int) -> dict[str, float]:
    """Rank 0 scores the validation users; every rank gets the same figures (one decision to stop for all)."""
    out = torch.zeros(2, dtype=torch.float64)
    if rank == 0:
        model.eval()
        scores = ranking_validation(model, data, device)
        model.train()
        out = torch.tensor([scores[VAL_METRIC], scores["val_recall@100"]], dtype=torch.float64)
    if world > 1:
        torch.distributed.broadcast(out, src=0)  # gloo on CPU: the process group DDP set up
    return {VAL_METRIC: float(out[0]), "val_recall@100": float(out[1])}


def fit_on_ray(spec: FitSpec, data: dict[str, np.ndarray], cfg: TrainConfig,
               run_name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Trains one model with `TorchTrainer` and returns its state dict and the per-epoch metrics.

    With validation arrays in `data` (`training.fit.validation.validation_arrays`), every epoch is scored on them,
    training stops after `cfg.patience` epochs without a better NDCG@10 (`spec.epochs` is the budget), and the state
    returned is the best epoch's. Without them the last epoch's state is returned.

    A run of the same `run_name` under `cfg.storage_path` that stopped early resumes from its last checkpoint: Ray
    Train hands the loop that checkpoint through `ray.train.get_checkpoint()`.
    """
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller polls its workers every 2 s by default, so a fit of seconds waits for the next poll at
    # start and at its end; a shorter poll costs a few pings (the variable reaches the controller, see ray.train.v2).
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(HEALTH_CHECK_INTERVAL_S))
    loop_config = {"model": spec.model, "model_config": spec.model_config, "data": ray.put(data),
                   "inputs": list(spec.inputs), "epochs": spec.epochs, "batch_size": spec.batch_size, "lr": spec.lr,
                   "threads": cfg.threads_per_worker, "seed": cfg.seed, "progress": cfg.progress,
                   "patience": cfg.patience}
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        # Every epoch's checkpoint is kept: Ray Train builds the metrics history from them.
        run_config=RunConfig(name=run_name, storage_path=str(Path(cfg.storage_path).resolve())),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training {spec.model} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as d:
        saved = torch.load(Path(d) / "state.pt", weights_only=False)
    state = saved.get("best_model") or saved["model"]  # the best validation epoch's weights when validated
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [result.metrics]
    return state, history
