"""Catalog re-embedding on Ray Data into a version's FAISS shard actors, and the index manifest.

The item tower runs in `map_batches` on an actor pool (the model loads once per actor); each actor routes its
vectors straight to the shard actors, so no vector passes through the driver. Shards are named detached actors
`<version>-shard-<i>` in the namespace `recsys`: a version's retrieval replicas find them by name.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from indexing.index_types import IndexSpec, empty_index, stored_ids
from indexing.shards import FaissShard, shard_of
from training import NAMESPACE
from training.data.schemas import iso_utc_now
from training.fit.bundle import load_bundle

INDEX_MANIFEST = "index.json"
INDEX_DIR = "index"  # the persisted shards, beside the bundle: index/<build>/shard-<i>.faiss
LAYOUTS = ("auto", "in_process", "sharded")


@dataclass(frozen=True)
class IndexConfig:
    n_shards: int = 2  # shards per version; each is one actor, placed anywhere in the cluster
    batch_size: int = 4096  # items per item-tower call: large enough to amortise torch overhead
    embed_actors: int = 2  # Ray Data actor pool size for the item tower
    # Per embedding actor. Fractional, and small enough that Ray Data's own 1-CPU tasks still fit on a 2-core node.
    embed_cpus: float = 0.25
    shard_cpus: float = 0.05  # shards idle between searches; a small reservation keeps them schedulable anywhere
    ann: IndexSpec = field(default_factory=IndexSpec)  # the index type and its knobs (indexing/index_types.py)

    def to_dict(self) -> dict:
        return asdict(self)


def shard_name(version: str, i: int) -> str:
    return f"{version}-shard-{i}"


class ShardActor(FaissShard):
    """A shard that survives its process: Ray restarts a crashed shard actor with the same constructor arguments,
    and the constructor reloads the shard's persisted file when it exists, so it comes back with every vector it
    had saved (a shard dies with what it held before its first `persist` only during its build, which then fails its
    count check instead of serving a partial index)."""

    def __init__(self, dim: int, spec: IndexSpec, template: bytes | None, path: str) -> None:
        self.path = path
        saved = Path(path).read_bytes() if Path(path).is_file() else None
        super().__init__(dim, spec, saved or template)
        if saved is not None:
            self._mark(stored_ids(self.index), True)

    def persist(self) -> str:
        """Writes the shard to its file; returns the file's sha256."""
        return self.save(self.path)


def create_shards(version: str, dim: int, cfg: IndexConfig, folder: Path,
                  template: bytes | None = None) -> list[ray.actor.ActorHandle]:
    """Fresh, empty shard actors for a version (any old ones of that name are killed first), each of the configured
    index type and persisting to `folder/shard-<i>.faiss`; `template` is the trained empty index of the IVF types.
    They restart after a crash (reloading their file) and a call that hit a restarting shard is retried once."""
    drop_shards(version)
    actor = ray.remote(ShardActor)
    return [actor.options(name=shard_name(version, i), namespace=NAMESPACE, lifetime="detached",
                          num_cpus=cfg.shard_cpus, max_restarts=-1, max_task_retries=1).remote(
        dim, cfg.ann, template, str(folder / f"shard-{i}.faiss")) for i in range(cfg.n_shards)]


def training_template(bundle, spec: IndexSpec, dim: int, seed: int = 0) -> bytes | None:
    """The trained empty index of an IVF type, learnt from the item vectors of a sample of the catalog (the item
    tower runs here, on at most `spec.train_size` items); None for the types that need no training."""
    if not spec.needs_training:
        return None
    f = bundle.item_features()  # row 0 = padding
    rows = np.random.default_rng(seed).permutation(np.arange(1, len(f.item_idx)))[:spec.train_size]
    with torch.inference_mode():
        sample = bundle.two_tower().item_tower(*(torch.from_numpy(a[rows]) for a in (
            f.item_idx, f.brand_idx, f.category_idx, f.price_bucket))).numpy()
    return faiss.serialize_index(empty_index(spec, dim, sample)).tobytes()


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
    # Each build persists into a folder of its own, so a rebuild never reloads or overwrites the files the index
    # being replaced was served from; the manifest names the folder, older ones are removed once it is written.
    build = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    folder = Path(bundle_dir).resolve() / INDEX_DIR / build
    folder.mkdir(parents=True)
    shards = create_shards(bundle.version, dim, cfg, folder, training_template(bundle, cfg.ann, dim))
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
    seconds = time.perf_counter() - t0  # the re-embedding, the figure of items/s
    if routed != len(bundle.items) or sum(s["ntotal"] for s in stats) != len(bundle.items):
        raise RuntimeError(f"index {bundle.version}: {routed} vectors routed, shards hold "
                           f"{sum(s['ntotal'] for s in stats)}, catalog has {len(bundle.items)}")
    # Each shard persists itself: a retrieval replica that holds the whole index in process loads these files, and
    # a restarted shard actor reloads its own.
    digests = ray.get([s.persist.remote() for s in shards])
    stats = [{**st, "file": f"{INDEX_DIR}/{build}/shard-{i}.faiss", "sha256": d}
             for i, (st, d) in enumerate(zip(stats, digests))]
    manifest = write_index_manifest(bundle_dir, bundle.version, dim, stats, seconds, cfg)
    for old in (Path(bundle_dir).resolve() / INDEX_DIR).iterdir():
        if old.is_dir() and old.name != build:
            shutil.rmtree(old, ignore_errors=True)
    return manifest


def write_index_manifest(bundle_dir: str | Path, version: str, dim: int, stats: list[dict], seconds: float,
                         cfg: IndexConfig) -> dict:
    """Records a built index beside its bundle (`index.json`): its shards with their counts, the build time."""
    n_items = sum(s["ntotal"] for s in stats)
    manifest = {"version": version, "index_type": cfg.ann.describe(), "ann": cfg.ann.to_dict(), "dim": dim,
                "n_items": n_items, "shards": [{"name": shard_name(version, i), **s} for i, s in enumerate(stats)],
                "build_seconds": seconds, "items_per_s": n_items / max(seconds, 1e-9),
                "built_at": iso_utc_now(), "config": cfg.to_dict()}
    (Path(bundle_dir) / INDEX_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def index_layout(manifest: dict, layout: str, memory_mb: float) -> str:
    """Where a retrieval replica searches: "in_process" (it loads every persisted shard and searches in its own
    memory, no network hop) or "sharded" (it fans out to the shard actors). "auto" picks in_process when the whole
    index fits `memory_mb` and every shard was persisted, sharded otherwise."""
    if layout not in LAYOUTS:
        raise ValueError(f"index layout must be one of {list(LAYOUTS)}, got {layout!r}")
    persisted = all("file" in s for s in manifest["shards"])
    if layout == "in_process" and not persisted:
        raise ValueError(f"index {manifest['version']}: in_process layout needs persisted shards; run `recsys index`")
    if layout != "auto":
        return layout
    fits = sum(s["memory_bytes"] for s in manifest["shards"]) <= memory_mb * 2**20
    return "in_process" if persisted and fits else "sharded"


def load_shards(bundle_dir: str | Path, manifest: dict) -> list[FaissShard]:
    """Every persisted shard of an index, in process; a file that is missing, changed or short is refused."""
    shards = []
    for s in manifest["shards"]:
        path = Path(bundle_dir) / s["file"]
        if not path.is_file():
            raise FileNotFoundError(f"index shard {path}: missing; run `recsys index --bundle {bundle_dir}`")
        shard = FaissShard.load(str(path), s["sha256"], IndexSpec(**manifest.get("ann", {})))
        if shard.ntotal != s["ntotal"]:
            raise ValueError(f"index shard {path}: holds {shard.ntotal} vectors, the manifest says {s['ntotal']}")
        shards.append(shard)
    return shards


def has_index_manifest(bundle_dir: str | Path) -> bool:
    return (Path(bundle_dir) / INDEX_MANIFEST).is_file()


def read_index_manifest(bundle_dir: str | Path) -> dict:
    path = Path(bundle_dir) / INDEX_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index for this bundle; run `recsys index --bundle {bundle_dir}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable index manifest ({e}); rebuild it with `recsys index --bundle "
                         f"{bundle_dir}`") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path}: an index manifest needs a 'shards' list; rebuild it with `recsys index`")
    return manifest
