"""Catalog re-embedding on Ray Data into a version's FAISS shard actors, and the index manifest.

The item tower runs in `map_batches` on an actor pool (the model loads once per actor); each actor routes its
vectors straight to the shard actors, so no vector passes through the driver. Shards are named detached actors
`<version>-shard-<i>` in the namespace `recsys`: a version's retrieval replicas find them by name.
"""
from __future__ import annotations

import json
import os
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


def shard_name(version: str, build: str, i: int) -> str:
    """`<version>@<build>-shard-<i>`: a build's shards live beside the serving build's until the switch ('@' is not
    a character of version names)."""
    return f"{version}@{build}-shard-{i}"


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


def create_shards(version: str, build: str, dim: int, cfg: IndexConfig, folder: Path,
                  template: bytes | None = None) -> list[ray.actor.ActorHandle]:
    """Fresh, empty shard actors of one build of a version's index, beside any serving build's, each of the
    configured index type and persisting to `folder/shard-<i>.faiss`; `template` is the trained empty index of the
    IVF types. They restart after a crash (reloading their file) and a call that hit a restarting shard is retried
    once."""
    actor = ray.remote(ShardActor)
    return [actor.options(name=shard_name(version, build, i), namespace=NAMESPACE, lifetime="detached",
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


def get_shards(manifest: dict) -> list[ray.actor.ActorHandle]:
    """The shard actors of an index manifest's build; a missing one raises ValueError naming it."""
    out = []
    for s in manifest["shards"]:
        try:
            out.append(ray.get_actor(s["name"], namespace=NAMESPACE))
        except ValueError as e:
            raise ValueError(f"index shard {s['name']} not found: run `recsys index` for {manifest['version']}") from e
    return out


def drop_shards(version: str, keep_builds: tuple[str | None, ...] = ()) -> int:
    """Kills the shard actors of every build of a version but `keep_builds`; returns how many it killed."""
    names = [n for n in _named_shards(version) if n.split("@", 1)[1].rsplit("-shard-", 1)[0] not in keep_builds]
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        except ValueError:  # gone meanwhile
            pass
    return len(names)


def _named_shards(version: str) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a.get("namespace") == NAMESPACE and a["name"].startswith(f"{version}@")]


class ItemEmbedder:
    """Ray Data callable class: item tower over a batch of catalog rows, vectors pushed to the shard actors."""

    def __init__(self, bundle_dir: str, names: list[str]) -> None:
        torch.set_num_threads(1)
        bundle = load_bundle(bundle_dir)
        self.model = bundle.two_tower()
        self.shards = [ray.get_actor(name, namespace=NAMESPACE) for name in names]

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
    """Re-embeds the bundle's catalog into a new build beside the serving one and switches to it; returns the manifest.

    The build has shard actors and a folder of its own, so the index being replaced keeps serving meanwhile. Only a
    complete build is switched to: every shard holds its share (the counts checked against the catalog), persisted
    with its sha256; then `index.json` is replaced in one rename, which live retrieval replicas notice and load
    (`deployments.retrieval`). The previous build's actors and files stay until the next build, for the replicas
    still switching; older ones are removed.
    """
    bundle = load_bundle(bundle_dir)
    t0 = time.perf_counter()
    dim = bundle.config["two_tower"]["dim"]
    previous = read_index_manifest(bundle_dir).get("build") if has_index_manifest(bundle_dir) else None
    build = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    folder = Path(bundle_dir).resolve() / INDEX_DIR / build
    folder.mkdir(parents=True)
    template = training_template(bundle, cfg.ann, dim)
    phases = {"quantizer_training_s": time.perf_counter() - t0}  # where a build's time goes, in its manifest
    shards = create_shards(bundle.version, build, dim, cfg, folder, template)
    names = [shard_name(bundle.version, build, i) for i in range(cfg.n_shards)]
    t_embed = time.perf_counter()
    # The catalog snapshot is one file of a few integer columns (8 MB per 1M items): read it here and hand it to Ray
    # Data, because read_parquet's file-listing task asks for a whole CPU and on a 2-core node waits forever behind
    # the embedding actors. The vectors, the bulk of the work, never pass through the driver.
    items = pq.read_table(Path(bundle_dir) / "items.parquet",
                          columns=["item_idx", "brand_idx", "category_idx", "price_bucket"])
    ds = ray.data.from_arrow([items.slice(s, cfg.batch_size) for s in range(0, len(items), cfg.batch_size)])
    counts = ds.map_batches(ItemEmbedder, fn_constructor_args=(str(Path(bundle_dir).resolve()), names),
                            batch_size=cfg.batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(
                                size=cfg.embed_actors), num_cpus=cfg.embed_cpus)  # [1] the item tower on an actor pool
    routed = int(sum(row["count"] for row in counts.iter_rows()))
    # the Ray Data run: the embedding actors' start (each loads the bundle), the item tower, the shards' inserts
    phases["embed_and_insert_s"] = time.perf_counter() - t_embed
    stats = ray.get([s.stats.remote() for s in shards])
    seconds = time.perf_counter() - t0  # the re-embedding, the figure of items/s
    expected = np.bincount(shard_of(bundle.items.column("item_idx").to_numpy(), cfg.n_shards), minlength=cfg.n_shards)
    if routed != len(bundle.items) or [s["ntotal"] for s in stats] != expected.tolist():
        for a in shards:  # never switched to: the serving build goes on
            ray.kill(a)
        shutil.rmtree(folder, ignore_errors=True)
        raise RuntimeError(f"index {bundle.version}: {routed} vectors routed, shards hold "
                           f"{[s['ntotal'] for s in stats]}, the catalog's split is {expected.tolist()}")
    # Each shard persists itself: a retrieval replica that holds the whole index in process loads these files, and
    # a restarted shard actor reloads its own.
    t_persist = time.perf_counter()
    digests = ray.get([s.persist.remote() for s in shards])
    phases["persist_s"] = time.perf_counter() - t_persist
    stats = [{**st, "file": f"{INDEX_DIR}/{build}/shard-{i}.faiss", "sha256": d}
             for i, (st, d) in enumerate(zip(stats, digests))]
    # the switch: one rename, after every check
    manifest = write_index_manifest(bundle_dir, bundle.version, dim, stats, seconds, cfg, build, names, phases)
    keep = {build, previous}
    drop_shards(bundle.version, keep_builds=tuple(keep))
    for old in (Path(bundle_dir).resolve() / INDEX_DIR).iterdir():
        if old.is_dir() and old.name not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return manifest



def write_index_manifest(bundle_dir: str | Path, version: str, dim: int, stats: list[dict], seconds: float,
                         cfg: IndexConfig, build: str = "local", names: list[str] | None = None,
                         phases: dict[str, float] | None = None) -> dict:
    """Records a built index beside its bundle (`index.json`): its build, its shards with their counts and actor
    names, the build time and (`phases`) where it went. Written to a temporary file and renamed over the old one:
    a reader sees the old manifest or the new one, never part of it."""
    n_items = sum(s["ntotal"] for s in stats)
    names = names or [shard_name(version, build, i) for i in range(len(stats))]
    manifest = {"version": version, "build": build, "index_type": cfg.ann.describe(), "ann": cfg.ann.to_dict(),
                "dim": dim, "n_items": n_items, "shards": [{"name": n, **s} for n, s in zip(names, stats)],
                "build_seconds": seconds, "items_per_s": n_items / max(seconds, 1e-9), "phases": phases or {},
                "built_at": iso_utc_now(), "config": cfg.to_dict()}
    tmp = Path(bundle_dir) / f".{INDEX_MANIFEST}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, Path(bundle_dir) / INDEX_MANIFEST)
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
