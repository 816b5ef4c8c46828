"""Catalog re-embedding on Ray Data into a version's FAISS shard actors, and the index manifest.

The item tower runs in `map_batches` on an actor pool (the model loads once per actor); each actor routes its
vectors straight to the shard actors, so no vector passes through the driver. Shards are named detached actors
`<version>-shard-<i>` in the namespace `recsys`: a version's retrieval replicas find them by name.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from indexing.shards import FaissShard, shard_of
from training import NAMESPACE
from training.data.schemas import iso_utc_now
from training.fit.bundle import load_bundle

INDEX_MANIFEST = "index.json"


@dataclass(frozen=True)
class IndexConfig:
    n_shards: int = 2  # shards per version; each is one actor, placed anywhere in the cluster
    batch_size: int = 4096  # items per item-tower call: large enough to amortise torch overhead
    embed_actors: int = 2  # Ray Data actor pool size for the item tower
    # Per embedding actor. Fractional, and small enough that Ray Data's own 1-CPU tasks still fit on a 2-core node.
    embed_cpus: float = 0.25
    shard_cpus: float = 0.05  # shards idle between searches; a small reservation keeps them schedulable anywhere

    def to_dict(self) -> dict:
        return asdict(self)


def shard_name(version: str, i: int) -> str:
    return f"{version}-shard-{i}"


def create_shards(version: str, dim: int, cfg: IndexConfig) -> list[ray.actor.ActorHandle]:
    """Fresh, empty shard actors for a version (any old ones of that name are killed first)."""
    drop_shards(version)
    actor = ray.remote(FaissShard)
    return [actor.options(name=shard_name(version, i), namespace=NAMESPACE, lifetime="detached",
                          num_cpus=cfg.shard_cpus).remote(dim) for i in range(cfg.n_shards)]


def get_shards(version: str, n_shards: int) -> list[ray.actor.ActorHandle]:
    """The shard actors of a version; a missing one raises ValueError naming it."""
    out = []
    for i in range(n_shards):
        try:
            out.append(ray.get_actor(shard_name(version, i), namespace=NAMESPACE))
        except ValueError as e:
            raise ValueError(f"index shard {shard_name(version, i)} not found: run `recsys index` for {version}") from e
    return out


def drop_shards(version: str, max_shards: int = 1024) -> int:
    """Kills the shard actors of a version; returns how many there were."""
    killed = 0
    for i in range(max_shards):
        try:
            ray.kill(ray.get_actor(shard_name(version, i), namespace=NAMESPACE))
            killed += 1
        except ValueError:
            break
    return killed


class ItemEmbedder:
    """Ray Data callable class: item tower over a batch of catalog rows, vectors pushed to the shard actors."""

    def __init__(self, bundle_dir: str, n_shards: int) -> None:
        torch.set_num_threads(1)
        bundle = load_bundle(bundle_dir)
        self.model = bundle.two_tower()
        self.shards = get_shards(bundle.version, n_shards)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["item_idx"].astype(np.int64)
        with torch.inference_mode():
            xb = self.model.item_tower(*(torch.from_numpy(batch[c].astype(np.int64))
                                         for c in ("item_idx", "brand_idx", "category_idx", "price_bucket"))).numpy()
        dest = shard_of(ids, len(self.shards))
        refs = [self.shards[s].add.remote(ids[dest == s], xb[dest == s]) for s in np.unique(dest)]
        ray.get(refs)  # [2] back-pressure: the next batch starts once this one is stored
        return {"shard": np.unique(dest), "count": np.bincount(dest)[np.unique(dest)]}


def embed_catalog(bundle_dir: str | Path, cfg: IndexConfig) -> dict:
    """Re-embeds the bundle's catalog into fresh shards and writes `bundle_dir/index.json`; returns the manifest."""
    bundle = load_bundle(bundle_dir)
    t0 = time.perf_counter()
    dim = bundle.config["two_tower"]["dim"]
    shards = create_shards(bundle.version, dim, cfg)
    # The catalog snapshot is one file of a few integer columns (8 MB per 1M items): read it here and hand it to Ray
    # Data, because read_parquet's file-listing task asks for a whole CPU and on a 2-core node waits forever behind
    # the embedding actors. The vectors, the bulk of the work, never pass through the driver.
    items = pq.read_table(Path(bundle_dir) / "items.parquet",
                          columns=["item_idx", "brand_idx", "category_idx", "price_bucket"])
    ds = ray.data.from_arrow([items.slice(s, cfg.batch_size) for s in range(0, len(items), cfg.batch_size)])
    counts = ds.map_batches(ItemEmbedder, fn_constructor_args=(str(Path(bundle_dir).resolve()), cfg.n_shards),
                            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
                                size=cfg.embed_actors), num_cpus=cfg.embed_cpus)  # [1] the item tower on an actor pool
    routed = int(sum(row["count"] for row in counts.iter_rows()))
    stats = ray.get([s.stats.remote() for s in shards])
    seconds = time.perf_counter() - t0
    if routed != len(bundle.items) or sum(s["ntotal"] for s in stats) != len(bundle.items):
        raise RuntimeError(f"index {bundle.version}: {routed} vectors routed, shards hold "
                           f"{sum(s['ntotal'] for s in stats)}, catalog has {len(bundle.items)}")
    return write_index_manifest(bundle_dir, bundle.version, dim, stats, seconds, cfg)


def write_index_manifest(bundle_dir: str | Path, version: str, dim: int, stats: list[dict], seconds: float,
                         cfg: IndexConfig) -> dict:
    """Records a built index beside its bundle (`index.json`): its shards with their counts, the build time."""
    n_items = sum(s["ntotal"] for s in stats)
    manifest = {"version": version, "index_type": "exact inner product (faiss IndexFlatIP)", "dim": dim,
                "n_items": n_items, "shards": [{"name": shard_name(version, i), **s} for i, s in enumerate(stats)],
                "build_seconds": seconds, "items_per_s": n_items / max(seconds, 1e-9),
                "built_at": iso_utc_now(), "config": cfg.to_dict()}
    (Path(bundle_dir) / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_index_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / INDEX_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index for this bundle; run `recsys index --bundle {bundle_dir}`")
    return json.loads(path.read_text())
