"""Ray Train loops: data-parallel (DDP) training of the two-tower model and the ranker on N workers.

The loop is one function for both models: the worker gets the model kind, its config and an object-store reference
to the example arrays, takes its shard by rank, and reports loss and throughput each epoch with a checkpoint.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.ranker import MultiTaskRanker, RankerConfig
from training.two_tower import TwoTower, TwoTowerConfig


@dataclass(frozen=True)
class TrainConfig:
    num_workers: int = 2  # data-parallel workers; 2 shows DDP on a laptop
    cpus_per_worker: float = 0.5  # fractional so training fits beside Serve replicas on a 2-core machine
    threads_per_worker: int = 1  # torch intra-op threads; 1 avoids oversubscribing the cores the workers share
    use_gpu: bool = False  # one GPU per worker when true; nothing else changes
    tower_epochs: int = 3
    tower_batch_size: int = 1024  # per worker; also the number of in-batch negatives
    tower_lr: float = 3e-3
    ranker_epochs: int = 2
    ranker_batch_size: int = 2048
    ranker_lr: float = 3e-3
    ranker_max_impressions: int = 600_000  # a uniform sample of views bounds ranker time on big shops
    dim: int = 64
    history_len: int = 20
    test_fraction: float = 0.1  # the newest 10% of events are held out
    eval_users: int = 5000
    seed: int = 0
    storage_path: str = "runs"  # Ray Train checkpoints; must be shared storage on a multi-node cluster

    def to_dict(self) -> dict:
        return asdict(self)


def build_model(kind: str, model_config: dict) -> TwoTower | MultiTaskRanker:
    if kind == "two_tower":
        return TwoTower(TwoTowerConfig(**model_config))
    if kind == "ranker":
        cfg = dict(model_config)
        cfg["task_weights"] = tuple(cfg["task_weights"])
        return MultiTaskRanker(RankerConfig(**cfg))
    raise ValueError(f"unknown model kind {kind!r}; expected 'two_tower' or 'ranker'")


def train_loop_per_worker(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train
    import ray.train.torch

    kind, epochs, batch_size, lr = config["kind"], config["epochs"], config["batch_size"], config["lr"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(config["seed"])  # same init on every rank; DDP also broadcasts rank 0's weights
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    data: dict[str, np.ndarray] = ray.get(config["data"])  # [1] every worker reads the arrays from the object store
    model = build_model(kind, config["model_config"])
    model.set_item_features(*(torch.from_numpy(np.array(data[k])) for k in ("item_brand", "item_category", "item_price")))
    if kind == "two_tower":
        model.set_sampling_log_q(torch.from_numpy(np.array(data["item_counts"])))
    model = ray.train.torch.prepare_model(model)  # [2] DDP (gloo on CPU, nccl on GPU) and device placement
    device = ray.train.torch.get_device()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    inputs = config["inputs"]
    n = len(data[inputs[0]])
    steps = max(1, n // (batch_size * world))  # equal steps on every rank, or DDP waits on a missing all-reduce
    for epoch in range(epochs):
        order = np.random.default_rng(config["seed"] + epoch).permutation(n)[rank::world]
        model.train()
        t0, total = time.perf_counter(), 0.0
        for s in range(steps):
            idx = order[s * batch_size:(s + 1) * batch_size]
            batch = [torch.from_numpy(data[k][idx]).to(device) for k in inputs]
            loss = model(*batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        seconds = time.perf_counter() - t0
        metrics = {"epoch": epoch + 1, "loss": total / steps, "seconds": seconds,
                   "examples_per_s": steps * batch_size * world / seconds}
        if rank == 0:
            print(f"[{kind}] epoch {epoch + 1}/{epochs} loss {metrics['loss']:.4f} "
                  f"{metrics['examples_per_s']:,.0f} examples/s on {world} workers", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(getattr(model, "module", model).state_dict(), Path(tmp) / "model.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))  # [3] checkpoint
        else:
            ray.train.report(metrics)


def fit_on_ray(kind: str, model_config: dict, data: dict[str, np.ndarray], inputs: list[str], cfg: TrainConfig,
               run_name: str) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Trains one model with `TorchTrainer` and returns its final state dict and the per-epoch metrics."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    epochs, batch_size, lr = ((cfg.tower_epochs, cfg.tower_batch_size, cfg.tower_lr) if kind == "two_tower"
                              else (cfg.ranker_epochs, cfg.ranker_batch_size, cfg.ranker_lr))
    loop_config = {"kind": kind, "model_config": model_config, "data": ray.put(data), "inputs": inputs,
                   "epochs": epochs, "batch_size": batch_size, "lr": lr, "threads": cfg.threads_per_worker,
                   "seed": cfg.seed}
    resources = {"CPU": cfg.cpus_per_worker} | ({"GPU": 1} if cfg.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=run_name, storage_path=str(Path(cfg.storage_path).resolve())),
    )
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training {kind} failed: {result.error}") from result.error
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / "model.pt", weights_only=True)
    history = result.metrics_dataframe.to_dict("records") if result.metrics_dataframe is not None else [result.metrics]
    return state, history
