"""Training throughput of the seed-000 two-tower on Ray Train: examples/s for 1 and 2 workers side by side.

The same examples (a synthetic shop's training part under the temporal split), the same per-worker batch and the
same number of epochs for every row; only the worker count changes (and `--use-gpu` adds rows with
`ScalingConfig(use_gpu=True)`, nothing else changed). examples/s is measured by the loop over each epoch's steps
(Ray start-up excluded); `fit_s` is the whole `fit_on_ray` call, start-up included.
Usage: python -m bench.training [--size demo] [--workers 1,2] [--epochs 1] [--use-gpu] [--out bench/results/training.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from training.data.splits import temporal
from training.fit.retrieval import SeedTwoTowerRetrieval, tower_data
from training.data.synthetic import SIZES, generate_shop
from training.fit.train_loop import FitSpec, TrainConfig, fit_on_ray


def subset(data: dict[str, np.ndarray], n_max: int | None, seed: int = 0) -> dict[str, np.ndarray]:
    """A uniform sample of at most n_max examples; per-item arrays (lookups, counts) are kept whole."""
    n = len(data["target"])
    if n_max is None or n <= n_max:
        return data
    pick = np.sort(np.random.default_rng(seed).choice(n, size=n_max, replace=False))
    return {k: (v[pick] if len(v) == n else v) for k, v in data.items()}


def measure(spec: FitSpec, data: dict[str, np.ndarray], cfg: TrainConfig, label: str) -> dict:
    """One fit; returns the row of the table (with the machine's load, since shared cores distort the rates)."""
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    _, history = fit_on_ray(spec, data, cfg, f"bench-{label}-{os.getpid()}-{time.time_ns()}")
    fit_s = time.perf_counter() - t0
    rates = [float(h["examples_per_s"]) for h in history]
    return {"setup": label, "workers": cfg.num_workers, "use_gpu": cfg.use_gpu, "cpus_per_worker": cfg.cpus_per_worker,
            "batch_per_worker": spec.batch_size, "epochs": spec.epochs, "examples": len(data["target"]),
            "examples_per_s": float(np.mean(rates)), "examples_per_s_by_epoch": rates,
            "final_loss": float(history[-1]["loss"]), "fit_s": fit_s, "cpu_count": os.cpu_count(),
            "load_avg_1m": [load_before, os.getloadavg()[0]]}


def print_table(rows: list[dict]) -> None:
    print(f"{'setup':<12}{'workers':>8}{'gpu':>5}{'batch/w':>9}{'examples':>10}{'examples/s':>12}{'speed-up':>10}"
          f"{'fit s':>8}{'load':>7}")
    base = rows[0]["examples_per_s"] if rows else 1.0
    for r in rows:
        print(f"{r['setup']:<12}{r['workers']:>8}{'yes' if r['use_gpu'] else 'no':>5}{r['batch_per_worker']:>9}"
              f"{r['examples']:>10,}{r['examples_per_s']:>12,.0f}{r['examples_per_s'] / base:>9.2f}x{r['fit_s']:>8.1f}"
              f"{max(r['load_avg_1m']):>7.1f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--size", choices=sorted(SIZES), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts, measured in this order")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1024, help="per worker, the same in every row")
    p.add_argument("--cpus-per-worker", type=float, default=0.5)
    p.add_argument("--max-examples", type=int, default=None, help="train on a uniform sample of this many")
    p.add_argument("--user-encoder", choices=("transformer", "attention"), default="transformer")
    p.add_argument("--use-gpu", action="store_true", help="add the same rows with use_gpu=True (one GPU per worker)")
    p.add_argument("--out", type=Path, default=Path("bench/results/training.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    t0 = time.perf_counter()
    task = temporal(generate_shop(args.size, args.seed), max_users=1, dataset=f"synthetic-{args.size}")
    data = subset(tower_data(task), args.max_examples, args.seed)
    print(f"{len(data['target']):,} examples from the {args.size} shop in {time.perf_counter() - t0:.0f}s", flush=True)
    adapter = SeedTwoTowerRetrieval(epochs=args.epochs, batch_size=args.batch_size, user_encoder=args.user_encoder)
    workers = [int(w) for w in args.workers.split(",")]
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=max(2, int(np.ceil(max(workers) * args.cpus_per_worker)) + 1), log_to_driver=False,
                 include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as storage:
        base = TrainConfig(cpus_per_worker=args.cpus_per_worker, progress=False, storage_path=storage)
        spec = adapter.fit_spec(task, base)
        for use_gpu in ([False, True] if args.use_gpu else [False]):
            for w in workers:
                cfg = dataclasses.replace(base, num_workers=w, use_gpu=use_gpu)
                rows.append(measure(spec, data, cfg, f"{'gpu' if use_gpu else 'cpu'}-{w}w"))
                print_table(rows[-1:])
    if started_here:
        ray.shutdown()
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "model": spec.model, "model_config": spec.model_config,
                                    "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
