"""Index benchmark: every index type on the same item vectors (a trained bundle's item tower over its catalog) and
the same queries (user vectors of real users of the shop, from their histories), side by side in one run.

Each index structure is built once (on `--build-threads` FAISS threads) and searched at every setting of its sweep
(IVF nprobe, HNSW efSearch). Per setting: recall@k against exact search (the merged top k over all shards), p50/p99
of one query on one shard, of the fan-out to every shard plus the merge, and of the whole retrieval stage (one
user's tower pass, the fan-out and the merge), all in process on one thread; build time (training included) and
memory read from the index; and under two request filters applied inside the search (one category, in stock below
the median price), recall against the exact filtered top k and how often a list is as full as exact's. Writes JSON
and a recall-latency plot (PNG beside it).
Usage: python -m bench.index [--bundle bundles/shop-*/v1] [--data data/shop] [--kinds ivf_flat,hnsw] [--shards 4]
       [--out bench/results/index.json]; the 1M-item figures: `recsys generate --size large --out data/large`,
       `recsys train --config large --data data/large --version v1`, then `--bundle` that bundle, `--data data/large`.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

from bench.ranking import timed
from indexing.index_types import KINDS, IndexSpec, empty_index
from indexing.shards import FaissShard, merge_top_k, pack_allowed, shard_of
from training.data.schemas import read_shop
from training.data.splits import temporal
from training.fit.bundle import load_bundle
from training.fit.offline_metrics import item_vectors
from training.request.contracts import ItemFilter
from training.request.forward import ForwardIndex

def nlist_for(n_items: int) -> int:
    """IVF lists for a catalog: the power of two nearest 2 sqrt(n) (FAISS's rule of thumb is sqrt(n) to 4 sqrt(n)):
    512 for the demo's 50k items, 2048 for the large shop's 1M."""
    return max(16, 2 ** round(np.log2(2 * np.sqrt(max(n_items, 1)))))


def structures(n_items: int, kinds: tuple[str, ...] = KINDS) -> list[tuple[IndexSpec, list[dict[str, int]]]]:
    """Each index structure to build once, with the search-time settings swept over that one build."""
    nlist = nlist_for(n_items)
    train = min(n_items, max(IndexSpec().train_size, 64 * nlist))  # 64 training vectors per list
    ivf = {"nlist": nlist, "train_size": train}
    out = [(IndexSpec("flat"), [{}]),
           (IndexSpec("ivf_flat", **ivf), [{"nprobe": p} for p in (4, 8, 16, 32, 64, 128)]),
           (IndexSpec("ivf_sq8", **ivf), [{"nprobe": p} for p in (16, 32, 64)]),
           (IndexSpec("ivf_pq", pq_m=16, **ivf), [{"nprobe": 32}]),
           (IndexSpec("ivf_pq", pq_m=32, **ivf), [{"nprobe": 32}, {"nprobe": 64}]),
           (IndexSpec("hnsw", hnsw_m=32, ef_construction=80), [{"ef_search": e} for e in (500, 800, 1200)])]
    return [(spec, sweep) for spec, sweep in out if spec.kind == "flat" or spec.kind in kinds]


def build(spec: IndexSpec, V: np.ndarray, n_shards: int, threads: int = 1) -> tuple[list[FaissShard], float]:
    """The shards of one index type over the vectors (row i = item index i), and the seconds it took with `threads`
    FAISS threads (k-means training and HNSW insertion run in parallel; searches are timed on one)."""
    faiss.omp_set_num_threads(threads)
    t0 = time.perf_counter()
    ids = np.arange(1, len(V), dtype=np.int64)
    sample = V[np.random.default_rng(0).permutation(ids)[:spec.train_size]]
    template = faiss.serialize_index(empty_index(spec, V.shape[1], sample)).tobytes() if spec.needs_training else None
    shards = [FaissShard(V.shape[1], spec, template) for _ in range(n_shards)]
    dest = shard_of(ids, n_shards)
    for s, shard in enumerate(shards):
        shard.add(ids[dest == s], V[ids[dest == s]])
    seconds = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    return shards, seconds


def search_all(shards: list[FaissShard], xq: np.ndarray, k: int, allowed: np.ndarray | None = None) -> np.ndarray:
    parts = [s.search(xq, k, allowed) for s in shards]
    return merge_top_k([d for d, _ in parts], [i for _, i in parts], k)[1]


def recall_of(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(f[f > 0], t[t > 0])) / max((t > 0).sum(), 1)
                          for f, t in zip(found, truth)]))


def measure(spec: IndexSpec, sweep: list[dict[str, int]], V: np.ndarray, xq: np.ndarray, truth: np.ndarray,
            k: int, n_shards: int, runs: int, filters: dict[str, tuple[np.ndarray, np.ndarray]],
            stage: Callable[[int], np.ndarray], threads: int) -> list[dict[str, Any]]:
    """The figures of one index structure, built once, at each search setting of `sweep`; `filters`: name ->
    (packed allowed bitmap, the exact filtered top k); `stage(i)`: user i's query vector from the user tower."""
    shards, seconds = build(spec, V, n_shards, threads)
    memory = sum(s.stats()["memory_bytes"] for s in shards) / 2**20
    out = []
    for knobs in sweep:
        for shard in shards:
            shard.tune(**knobs)
        tuned = shards[0].spec
        recall = recall_of(search_all(shards, xq, k), truth)
        q = iter(np.tile(np.arange(len(xq)), 4 * runs // len(xq) + 2))
        one_shard = timed(lambda: shards[0].search(xq[next(q)][None], k), runs)
        fan_out = timed(lambda: search_all(shards, xq[next(q)][None], k), runs)
        whole = timed(lambda: search_all(shards, stage(next(q)), k), runs)  # user tower + fan-out + merge
        filtered = {}
        for name, (allowed, exact) in filters.items():  # the filter applied inside each shard's search
            found = search_all(shards, xq, k, allowed)
            filtered[name] = {f"recall@{k}": recall_of(found, exact),
                              "full_lists": float(np.mean((found > 0).sum(1) == (exact > 0).sum(1))),
                              "fan_out_merge": timed(lambda: search_all(shards, xq[next(q)][None], k, allowed),
                                                     max(runs // 4, 10))}
        out.append({"kind": spec.kind, "setting": tuned.describe(), "spec": tuned.to_dict(), f"recall@{k}": recall,
                    "build_s": seconds, "build_threads": threads, "memory_mb": memory, "shard": one_shard,
                    "fan_out_merge": fan_out, "retrieval_stage": whole, "filtered": filtered})
        print(f"  {tuned.describe()}: recall@{k} {recall:.3f}, fan-out p50 {fan_out['p50_ms']:.2f} ms", flush=True)
    return out


def request_filters(bundle: Any) -> dict[str, ItemFilter]:
    """Two filters a shopper sends: one category of median size (a few percent of the catalog), and in stock under
    the median price (about half)."""
    counts = Counter(bundle.items.column("category").to_pylist())
    category = sorted(counts, key=counts.get)[len(counts) // 2]
    median = float(np.median(bundle.items.column("price").to_numpy()))
    return {f"category {category} ({counts[category]} items)": ItemFilter(categories=(category,)),
            f"in stock, price <= {median:.2f}": ItemFilter(in_stock=True, price_max=median)}


def plot(results: list[dict[str, Any]], k: int, path: Path) -> None:
    """One line per index structure through its sweep, each point labelled with its knob (nprobe, efSearch)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        lines.setdefault(r["setting"].split(" nprobe=")[0].split(" efSearch=")[0], []).append(r)
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for (name, rows), marker in zip(lines.items(), "osD^vP*X"):
        x = [r["fan_out_merge"]["p50_ms"] for r in rows]
        y = [r[f"recall@{k}"] for r in rows]
        ax.plot(x, y, marker=marker, label=name)
        knob = "ef_search" if rows[0]["kind"] == "hnsw" else "nprobe"
        if rows[0]["kind"] != "flat":
            for xi, yi, r in zip(x, y, rows):
                ax.annotate(str(r["spec"][knob]), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("fan-out + merge p50 ms (one query, one thread; labels: nprobe or efSearch)")
    ax.set_ylabel(f"recall@{k} against exact search")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
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
    p.add_argument("--kinds", default=",".join(KINDS[1:]), help="approximate types to build beside exact search")
    p.add_argument("--build-threads", type=int, default=os.cpu_count() or 1,
                   help="FAISS threads while building (searches are timed on one)")
    p.add_argument("--out", type=Path, default=Path("bench/results/index.json"))
    args = p.parse_args(argv)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise SystemExit(f"bench index --kinds: unknown {unknown}; known: {list(KINDS)}")
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
    users = [torch.from_numpy(a) for a in task.user_inputs()]
    with torch.inference_mode():
        xq = model.user_tower(*users).numpy()

    def stage(i: int) -> np.ndarray:  # one request's user tower, as the retrieval stage runs it
        with torch.inference_mode():
            return model.user_tower(*(a[i:i + 1] for a in users)).numpy()

    exact = build(IndexSpec("flat"), V, args.shards)[0]
    truth = search_all(exact, xq, args.k)
    forward = ForwardIndex(bundle.items)
    filters = {}
    for name, f in request_filters(bundle).items():
        allowed = pack_allowed(forward.allowed(f))
        filters[name] = (allowed, search_all(exact, xq, args.k, allowed))
    del exact
    print(f"{len(V) - 1:,} item vectors of {bundle_dir}, {len(xq)} real users' queries, k={args.k}, "
          f"{args.shards} shards, searches on 1 thread, builds on {args.build_threads}", flush=True)
    results = []
    for spec, sweep in structures(len(V) - 1, kinds):
        results += measure(spec, sweep, V, xq, truth, args.k, args.shards, args.runs, filters, stage,
                           args.build_threads)
    flat = results[0]["fan_out_merge"]["p50_ms"]
    print(f"{'setting':44s} {'recall':>7s} {'shard p50':>9s} {'p99':>7s} {'fan-out p50':>11s} {'p99':>7s} "
          f"{'speedup':>7s} {'stage p99':>9s} {'build s':>7s} {'MB':>6s}")
    for r in results:
        s, f = r["shard"], r["fan_out_merge"]
        r["speedup_vs_exact"] = flat / f["p50_ms"]
        print(f"{r['setting']:44s} {r[f'recall@{args.k}']:7.3f} {s['p50_ms']:9.2f} {s['p99_ms']:7.2f} "
              f"{f['p50_ms']:11.2f} {f['p99_ms']:7.2f} {r['speedup_vs_exact']:6.1f}x "
              f"{r['retrieval_stage']['p99_ms']:9.2f} {r['build_s']:7.1f} {r['memory_mb']:6.1f}")
    print(f"under filters (inside the search), recall@{args.k} / lists as full as exact / fan-out p50 ms:")
    for r in results:
        print(f"{r['setting']:44s} " + "   ".join(
            f"{name}: {f[f'recall@{args.k}']:.3f} / {f['full_lists']:.2f} / {f['fan_out_merge']['p50_ms']:.2f}"
            for name, f in r["filtered"].items()))
    good = [r for r in results if r[f"recall@{args.k}"] >= 0.95 and r["kind"] != "flat"]
    best = max(good, key=lambda r: r["speedup_vs_exact"]) if good else None
    print("fastest with recall >= 0.95: " + (
        f"{best['setting']} at {best['speedup_vs_exact']:.1f}x exact, retrieval stage (user tower + search + merge) "
        f"p99 {best['retrieval_stage']['p99_ms']:.2f} ms" if best else "none"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"bundle": str(bundle_dir), "items": int(len(V) - 1), "queries": int(len(xq)), "k": args.k,
           "shards": args.shards, "build_threads": args.build_threads, "results": results,
           "best_at_recall_0.95": best["setting"] if best else None, "calibrate_hint": "../shared/tools/calibrate.py"}
    args.out.write_text(json.dumps(out, indent=2, default=float))
    plot(results, args.k, args.out.with_suffix(".png"))
    print(f"-> {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
