"""In-process latency of each serving stage on one core, for a trained bundle: p50/p99 in ms, printed and as JSON.

Side by side in one run: retrieval (user tower + exact search over all shards + merge), ranking of the retrieved
candidates with the history encoded once, the same ranking with one history pass per candidate, and the policy.
Usage: python -m bench.stages [--bundle bundles/shop-*/v1] [--out bench/results/stages.json]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.ranking import timed
from indexing.shards import FaissShard, merge_top_k, shard_of
from training.fit.bundle import load_bundle
from training.data.features import CONTEXT_COLUMNS
from training.fit.offline_metrics import item_vectors
from training.request.contracts import RankedList, UserState
from training.request.policy import apply_policy
from training.request.policy_config import PolicyConfig
from training.models.ranker import score_candidates


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--out", type=Path, default=Path("bench/results/stages.json"))
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--candidates", type=int, default=500)
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args(argv)
    found = sorted(Path("bundles").glob("*/v1/manifest.json"), key=lambda m: m.stat().st_mtime)
    bundle_dir = args.bundle or (found[-1].parent if found else None)  # default: the newest demo bundle
    if bundle_dir is None:
        raise SystemExit("bench: no bundle found under bundles/; run `make demo` first or pass --bundle")
    torch.set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    tower, ranker = bundle.two_tower(), bundle.ranker()
    V = item_vectors(tower)
    ids = np.arange(1, len(V), dtype=np.int64)
    shards = [FaissShard(V.shape[1]) for _ in range(args.shards)]
    dest = shard_of(ids, args.shards)
    for s, shard in enumerate(shards):
        shard.add(ids[dest == s], V[ids[dest == s]])
    rng = np.random.default_rng(0)
    L = bundle.space.history_len
    hist = rng.integers(1, len(V), size=(1, L))
    acts = np.full((1, L), 2)
    ages = np.full((1, L), 5)
    ctx = np.ones((1, len(CONTEXT_COLUMNS)), dtype=np.int64)
    user_inputs = (hist, acts, ages, ctx)
    K = args.candidates

    def retrieve() -> np.ndarray:
        with torch.inference_mode():
            xq = tower.user_tower(*(torch.tensor(x) for x in user_inputs)).numpy()
        parts = [s.search(xq, K) for s in shards]
        return merge_top_k([d for d, _ in parts], [i for _, i in parts], K)[1][0]

    cands = retrieve()

    def rank_once() -> None:
        score_candidates(ranker, *user_inputs, [cands])

    def rank_per_candidate() -> None:  # what "encode the history once per request" saves
        n = len(cands)
        score_candidates(ranker, *(np.repeat(x, n, 0) for x in user_inputs), [c[None] for c in cands])

    items = bundle.items
    ranked = RankedList([f"i{c}" for c in cands], rng.random(len(cands)).astype(np.float32),
                        [items.column("brand")[int(c) - 1].as_py() for c in cands],
                        [items.column("category")[int(c) - 1].as_py() for c in cands], ["retrieval"] * len(cands))
    user = UserState({f"i{c}": time.time() for c in cands[::25]}, time.time())

    results = {"bundle": str(bundle_dir), "items": int(len(V) - 1), "candidates": int(len(cands)),
               "history_len": L, "threads": 1, "shards": args.shards,
               "retrieval": timed(retrieve, args.runs), "ranking_history_once": timed(rank_once, args.runs),
               "ranking_history_per_candidate": timed(rank_per_candidate, max(20, args.runs // 10)),
               "policy": timed(lambda: apply_policy(ranked, user, PolicyConfig()), args.runs)}
    results["ranking_speedup_p50"] = (results["ranking_history_per_candidate"]["p50_ms"]
                                      / results["ranking_history_once"]["p50_ms"])
    print(f"{'stage':32s} {'p50 ms':>8s} {'p99 ms':>8s}   ({results['items']:,} items, {len(cands)} candidates, 1 thread)")
    for k in ("retrieval", "ranking_history_once", "ranking_history_per_candidate", "policy"):
        print(f"{k:32s} {results[k]['p50_ms']:8.2f} {results[k]['p99_ms']:8.2f}")
    print(f"history once vs per candidate: {results['ranking_speedup_p50']:.1f}x faster at p50")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
