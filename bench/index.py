"""Index benchmark: every index type on the same item vectors (a trained bundle's item tower over its catalog) and
the same queries (user vectors of real users of the shop, from their histories), side by side in one run.

Per type and setting: recall@k against exact search (the merged top k over all shards), p50/p99 of one query on one
shard and of the fan-out to every shard plus the merge (in process, one thread), build time (training included)
and memory read from the index; and under two request filters applied inside the search (one category, in stock
below the median price), recall against the exact filtered top k and how often a list is as full as exact's. Writes JSON and a recall-latency plot (PNG beside it).
Usage: python -m bench.index [--bundle bundles/shop-*/v1] [--data data/shop] [--out bench/results/index.json]
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from bench.ranking import timed
from indexing.index_types import IndexSpec, empty_index
from indexing.shards import FaissShard, merge_top_k, pack_allowed, shard_of
from training.data.schemas import read_shop
from training.data.splits import temporal
from training.fit.bundle import load_bundle
from training.fit.offline_metrics import item_vectors
from training.request.contracts import ItemFilter
from training.request.forward import ForwardIndex

SETTINGS = [IndexSpec("flat")] + [IndexSpec("ivf_flat", nlist=256, nprobe=p) for p in (4, 8, 16, 32, 64)] + [
    IndexSpec("ivf_sq8", nlist=256, nprobe=16), IndexSpec("ivf_pq", nlist=256, nprobe=16, pq_m=16),
    IndexSpec("ivf_pq", nlist=256, nprobe=16, pq_m=32)] + [
    IndexSpec("hnsw", hnsw_m=32, ef_construction=80, ef_search=e) for e in (500, 800)]


def build(spec: IndexSpec, V: np.ndarray, n_shards: int) -> tuple[list[FaissShard], float]:
    """The shards of one index type over the vectors (row i = item index i), and the seconds it took."""
    t0 = time.perf_counter()
    ids = np.arange(1, len(V), dtype=np.int64)
    sample = V[np.random.default_rng(0).permutation(ids)[:spec.train_size]]
    template = faiss.serialize_index(empty_index(spec, V.shape[1], sample)).tobytes() if spec.needs_training else None
    shards = [FaissShard(V.shape[1], spec, template) for _ in range(n_shards)]
    dest = shard_of(ids, n_shards)
    for s, shard in enumerate(shards):
        shard.add(ids[dest == s], V[ids[dest == s]])
    return shards, time.perf_counter() - t0


def search_all(shards: list[FaissShard], xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    parts = [s.search(xq, k, allowed) for s in shards]
    return merge_top_k([d for d, _ in parts], [i for _, i in parts], k)[1]


def recall_of(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f > 0], t[t > 0])) / max((t > 0).sum(), 1)
                          for f, t in zip(found, truth)]))


def measure(spec: IndexSpec, V: np.ndarray, xq: np.ndarray, truth: np.ndarray, k: int, n_shards: int,
            runs: int, filters: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """One setting's figures; `filters`: name -> (packed allowed bitmap, the exact filtered top k)."""
    shards, seconds = build(spec, V, n_shards)
    recall = recall_of(search_all(shards, xq, k), truth)
    q = iter(np.tile(np.arange(len(xq)), runs // len(xq) + 2))
    one_shard = timed(lambda: shards[0].search(xq[next(q)][None], k), runs)
    fan_out = timed(lambda: search_all(shards, xq[next(q)][None], k), runs)
    filtered = {}
    for name, (allowed, exact) in filters.items():  # the filter applied inside each shard's search
        found = search_all(shards, xq, k, allowed)
        filtered[name] = {f"recall@{k}": recall_of(found, exact),
                          "full_lists": float(np.mean((found > 0).sum(1) == (exact > 0).sum(1))),
                          "fan_out_merge": timed(lambda: search_all(shards, xq[next(q)][None], k, allowed),
                                                 max(runs // 4, 10))}
    return {"kind": spec.kind, "setting": spec.describe(), "spec": spec.to_dict(), f"recall@{k}": recall,
            "build_s": seconds, "memory_mb": sum(s.stats()["memory_bytes"] for s in shards) / 2**20,
            "shard": one_shard, "fan_out_merge": fan_out, "filtered": filtered}


def request_filters(bundle: Any) -> dict[str, ItemFilter]:
    """Two filters a shopper sends: one category of median size (a few percent of the catalog), and in stock under
    the median price (about half)."""
    counts = Counter(bundle.items.column("category").to_pylist())
    category = sorted(counts, key=counts.get)[len(counts) // 2]
    median = float(np.median(bundle.items.column("price").to_numpy()))
    return {f"category {category} ({counts[category]} items)": ItemFilter(categories=(category,)),
            f"in stock, price <= {median:.2f}": ItemFilter(in_stock=True, price_max=median)}


def plot(results: list[dict[str, Any]], k: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["fan_out_merge"]["p50_ms"], r[f"recall@{k}"], label=r["setting"])
    ax.set_xlabel("fan-out + merge p50 ms (one query, one thread)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--data", type=Path, default=Path("data/shop"), help="the shop whose users give the queries")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=500)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--out", type=Path, default=Path("bench/results/index.json"))
    args = p.parse_args(argv)
    found = sorted(Path("bundles").glob("*/v1/manifest.json"), key=lambda m: m.stat().st_mtime)
    bundle_dir = args.bundle or (found[-1].parent if found else None)
    if bundle_dir is None:
        raise SystemExit("bench index: no bundle under bundles/; run `make demo` first or pass --bundle")
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    bundle = load_bundle(bundle_dir)
    model = bundle.two_tower()
    V = item_vectors(model)  # (n_items + 1, D), row 0 = padding
    task = temporal(read_shop(args.data), max_users=args.queries, seed=0)
    with torch.inference_mode():
        xq = model.user_tower(*(torch.from_numpy(a) for a in task.user_inputs())).numpy()
    exact = build(IndexSpec("flat"), V, args.shards)[0]
    truth = search_all(exact, xq, args.k)
    forward = ForwardIndex(bundle.items)
    filters = {}
    for name, f in request_filters(bundle).items():
        allowed = pack_allowed(forward.allowed(f))
        filters[name] = (allowed, search_all(exact, xq, args.k, allowed))
    results = [measure(spec, V, xq, truth, args.k, args.shards, args.runs, filters) for spec in SETTINGS]
    flat = results[0]["fan_out_merge"]["p50_ms"]
    print(f"{len(V) - 1:,} item vectors of {bundle_dir}, {len(xq)} real users' queries, k={args.k}, "
          f"{args.shards} shards, 1 thread")
    print(f"{'setting':44s} {'recall':>7s} {'shard p50':>9s} {'p99':>7s} {'fan-out p50':>11s} {'p99':>7s} "
          f"{'speedup':>7s} {'build s':>7s} {'MB':>6s}")
    for r in results:
        s, f = r["shard"], r["fan_out_merge"]
        r["speedup_vs_exact"] = flat / f["p50_ms"]
        print(f"{r['setting']:44s} {r[f'recall@{args.k}']:7.3f} {s['p50_ms']:9.2f} {s['p99_ms']:7.2f} "
              f"{f['p50_ms']:11.2f} {f['p99_ms']:7.2f} {r['speedup_vs_exact']:6.1f}x {r['build_s']:7.1f} "
              f"{r['memory_mb']:6.1f}")
    print(f"under filters (inside the search), recall@{args.k} / lists as full as exact / fan-out p50 ms:")
    for r in results:
        print(f"{r['setting']:44s} " + "   ".join(
            f"{name}: {f[f'recall@{args.k}']:.3f} / {f['full_lists']:.2f} / {f['fan_out_merge']['p50_ms']:.2f}"
            for name, f in r["filtered"].items()))
    good = [r for r in results if r[f"recall@{args.k}"] >= 0.95 and r["kind"] != "flat"]
    best = max(good, key=lambda r: r["speedup_vs_exact"]) if good else None
    print("fastest with recall >= 0.95: " + (f"{best['setting']} at {best['speedup_vs_exact']:.1f}x exact"
                                             if best else "none"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"bundle": str(bundle_dir), "items": int(len(V) - 1), "queries": int(len(xq)), "k": args.k,
           "shards": args.shards, "results": results,
           "best_at_recall_0.95": best["setting"] if best else None, "calibrate_hint": "../shared/tools/calibrate.py"}
    args.out.write_text(json.dumps(out, indent=2, default=float))
    plot(results, args.k, args.out.with_suffix(".png"))
    print(f"-> {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
