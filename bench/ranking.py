"""Ranking benchmark: 500 candidates with a history of 50 actions, in process on one thread, and the Serve Ranking
deployment's throughput with `@serve.batch` on and off, side by side in one run.

In process: p50/p99 of `score_candidates` with the history encoded once per request, against the same model
encoding the history once per candidate (what the history cache saves). Serve: the `Ranking` deployment on an
embedded Ray, one replica with a fractional CPU, driven by concurrent requests from this process; requests/s with
batching on and off. Latency does not depend on the weights, so without `--bundle` a bundle with an untrained
ranker (the shipped architecture and config) is written to a temporary directory.

Usage: python -m bench.ranking [--bundle bundles/<shop>/v1] [--out bench/results/ranking.json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from training.fit.bundle import load_bundle, write_bundle
from training.data.features import CONTEXT_COLUMNS, build_feature_space
from training.models.ranker import MultiTaskRanker, RankerConfig, score_candidates
from training.request.contracts import Candidates, RankRequest


def timed(fn: Callable[[], Any], runs: int, warmup: int = 5) -> dict[str, float]:
    """p50/p99/mean milliseconds of `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1000.0)
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(np.mean(ms)), "runs": runs}


def untrained_bundle(root: Path) -> Path:
    """A bundle with untrained models over the tiny synthetic catalog: the serving code path without a demo run."""
    from training.fit.version import items_table
    from training.data.synthetic import generate_shop
    from training.models.two_tower import TwoTower, TwoTowerConfig

    shop = generate_shop("tiny", 0)
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    torch.manual_seed(0)
    return write_bundle(root, "bench", space, items_table(shop.catalog, space, np.ones(space.n_items + 1)),
                        TwoTower(TwoTowerConfig(**space.sizes)), MultiTaskRanker(RankerConfig(**space.sizes)),
                        {}, "bench-untrained", {})


def request(n_items: int, candidates: int, history: int, seed: int) -> dict[str, Any]:
    """One ranking request: a full history of `history` actions, `candidates` distinct items."""
    rng = np.random.default_rng(seed)
    features = {"hist_items": rng.integers(1, n_items, (1, history)), "hist_actions": rng.integers(2, 6, (1, history)),
                "hist_ages": rng.integers(1, 20, (1, history)),
                "context": np.concatenate([rng.integers(1, 3, (1, 3)), np.zeros((1, len(CONTEXT_COLUMNS) - 3),
                                                                                int)], axis=1)}
    features = {k: v.astype(np.int64) for k, v in features.items()}
    return {"features": features, "item_idx": rng.choice(np.arange(1, n_items), candidates, replace=False)}


def in_process(model: MultiTaskRanker, req: dict[str, Any], runs: int) -> dict[str, Any]:
    """History once vs one history pass per candidate, one thread."""
    f, cands = req["features"], req["item_idx"]
    user = [f[k] for k in ("hist_items", "hist_actions", "hist_ages", "context")]
    n = len(cands)
    once = timed(lambda: score_candidates(model, *user, [cands]), runs)
    per_candidate = timed(lambda: score_candidates(model, *(np.repeat(x, n, 0) for x in user), [c[None] for c in cands]),
                          max(20, runs // 10))
    return {"ranking_history_once": once, "ranking_history_per_candidate": per_candidate,
            "speedup_p50": per_candidate["p50_ms"] / once["p50_ms"]}


async def _drive(handle: Any, requests: list[RankRequest], concurrency: int) -> float:
    sem = asyncio.Semaphore(concurrency)

    async def one(r: RankRequest) -> None:
        async with sem:
            await handle.rank.remote(r)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(r) for r in requests))
    return len(requests) / (time.perf_counter() - t0)


def serve_throughput(bundle_dir: Path, requests: list[dict[str, Any]], concurrency: int,
                     replica_cpus: float) -> dict[str, Any]:
    """Requests/s of one `Ranking` replica with `@serve.batch` on and off, on an embedded Ray."""
    import ray
    from ray import serve

    from deployments.ranking import Ranking

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False)  # [1] embedded Ray owned by this process, shut down below
    out: dict[str, Any] = {"concurrency": concurrency, "replica_cpus": replica_cpus, "requests": len(requests)}
    ranks = [RankRequest(Candidates(r["features"], r["item_idx"], np.zeros(len(r["item_idx"]), np.float32),
                                    ("retrieval",) * len(r["item_idx"])), len(r["item_idx"])) for r in requests]
    try:
        for batching in (True, False):
            name = f"bench-ranking-{'batched' if batching else 'unbatched'}"
            # [2] one fixed replica, so the comparison is batching alone and not autoscaling
            app = Ranking.options(name=name, num_replicas=1, autoscaling_config=None, max_ongoing_requests=64,
                                  ray_actor_options={"num_cpus": replica_cpus}).bind(str(bundle_dir), 1, batching, 16)
            handle = serve.run(app, name=name, route_prefix=None)
            asyncio.run(_drive(handle, ranks[:20], concurrency))  # warm-up
            rps = asyncio.run(_drive(handle, ranks, concurrency))
            out["batched" if batching else "unbatched"] = {"requests_per_s": rps}
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    out["batching_speedup"] = out["batched"]["requests_per_s"] / out["unbatched"]["requests_per_s"]
    return out


def print_table(results: dict[str, Any]) -> None:
    print(f"ranking {results['candidates']} candidates, history {results['history_len']}, "
          f"{results['threads']} thread, model {results['model']}")
    print(f"{'variant':32s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for k in ("ranking_history_once", "ranking_history_per_candidate"):
        print(f"{k:32s} {results[k]['p50_ms']:8.2f} {results[k]['p99_ms']:8.2f}")
    print(f"history once is {results['speedup_p50']:.1f}x faster at p50; p99 goal <= 10 ms: "
          f"{'met' if results['ranking_history_once']['p99_ms'] <= 10.0 else 'missed'}")
    if "serve" in results:
        s = results["serve"]
        print(f"Serve Ranking, 1 replica x {s['replica_cpus']} CPU, {s['concurrency']} concurrent requests:")
        for k in ("batched", "unbatched"):
            print(f"  @serve.batch {'on ' if k == 'batched' else 'off'}  {s[k]['requests_per_s']:8.1f} requests/s")
        print(f"  batching gives {s['batching_speedup']:.2f}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the benchmark, prints the table, writes `--out`; returns the results (for `recsys bench ranking`)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=None, help="a trained bundle (default: an untrained one)")
    p.add_argument("--out", type=Path, default=Path("bench/results/ranking.json"))
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--history", type=int, default=50)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--serve-requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--replica-cpus", type=float, default=0.5)
    p.add_argument("--no-serve", action="store_true", help="skip the Serve throughput part")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = args.bundle or untrained_bundle(Path(tmp))
        bundle = load_bundle(bundle_dir)
        model = bundle.ranker()
        n_items = bundle.space.n_items + 1
        reqs = [request(n_items, args.candidates, args.history, seed) for seed in range(max(1, args.serve_requests))]
        results: dict[str, Any] = {"bundle": str(args.bundle) if args.bundle else "untrained (temporary)",
                                   "model": type(model).__name__, "candidates": args.candidates,
                                   "history_len": args.history, "threads": torch.get_num_threads(),
                                   **in_process(model, reqs[0], args.runs)}
        if not args.no_serve:
            results["serve"] = serve_throughput(Path(bundle_dir), reqs, args.concurrency, args.replica_cpus)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
