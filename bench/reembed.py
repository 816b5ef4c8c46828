"""Re-embedding throughput: a bundle's catalog re-embedded by the item tower on Ray Data into a new index build, with
one embedding actor and with one per CPU of the cluster, one after the other in one run (items/s and seconds of the
embedding, the whole build with its checks and persisting). Each run is a real rebuild: it switches the bundle's
live index to the new build, as `recsys index` does.

Usage: python -m bench.reembed [--bundle bundles/shop-*/v1] [--config large] [--out bench/results/reembed.json]
As a job on a cluster (Ray Data prints its progress in the job's logs):
  ray job submit --address http://HEAD:8265 --working-dir . -- python -m bench.reembed --bundle $PWD/bundles/...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    import ray

    from cluster.config import load_config
    from cluster.runtime import init_ray
    from indexing.embed import IndexConfig, embed_catalog

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bundle", type=Path, default=None, help="default: the newest demo bundle's v1")
    p.add_argument("--config", default=None, help="YAML config or built-in name whose `index` (shards, index type) "
                   "the builds use, e.g. large; default: 2 exact shards")
    p.add_argument("--out", type=Path, default=Path("bench/results/reembed.json"))
    args = p.parse_args(argv)
    found = sorted(Path("bundles").glob("*/v1/manifest.json"), key=lambda m: m.stat().st_mtime)
    bundle_dir = args.bundle or (found[-1].parent if found else None)
    if bundle_dir is None or not (Path(bundle_dir) / "manifest.json").is_file():
        raise SystemExit(f"bench reembed: no bundle at {bundle_dir or 'bundles/*/v1'}; run `make demo` or pass --bundle")
    init_ray()
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    base = load_config(args.config).index if args.config else IndexConfig()
    runs = []
    for actors in dict.fromkeys((1, cpus)):  # one run when the cluster has one CPU
        cfg = dataclasses.replace(base, embed_actors=actors, embed_cpus=min(base.embed_cpus, cpus / (actors + 1)))
        t0 = time.perf_counter()
        manifest = embed_catalog(bundle_dir, cfg)
        runs.append({"embed_actors": actors, "embed_cpus_each": cfg.embed_cpus, "items": manifest["n_items"],
                     "embed_seconds": round(manifest["build_seconds"], 2),
                     "items_per_s": round(manifest["items_per_s"], 1),
                     "build_seconds": round(time.perf_counter() - t0, 2), "build": manifest["build"],
                     "phases": {k: round(v, 2) for k, v in manifest["phases"].items()}})
        print(f"re-embed with {actors} actor(s): {manifest['n_items']:,} items, {manifest['items_per_s']:,.0f} "
              f"items/s ({manifest['build_seconds']:.1f} s embedding, {runs[-1]['build_seconds']:.1f} s build; "
              + ", ".join(f"{k} {v:.1f}" for k, v in manifest["phases"].items()) + ")", flush=True)
    result = {"bundle": str(bundle_dir), "cluster_cpus": cpus, "index": base.to_dict(), "runs": runs,
              "speedup_all_cpus": runs[-1]["items_per_s"] / runs[0]["items_per_s"]}
    print(f"all CPUs ({cpus}) / one actor: {result['speedup_all_cpus']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
