"""Bundles: one immutable model version on disk (`bundles/<version>/`), verified by checksums when read."""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from training.data.features import FeatureSpace, ItemFeatures
from training.data.schemas import iso_utc_now

VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")  # also a Serve app name and an actor name prefix
MANIFEST = "manifest.json"
# Bumped when the files or configs a bundle holds change shape; a bundle of another format is refused, not misread.
# 2: model class paths in config.json, action ages and query tokens in the model inputs, in_stock in items.parquet.
# 3: models under training/models/ (new class paths), the retrieval model's name and condition settings in config.json.
BUNDLE_FORMAT = 3


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or does not match its manifest."""


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ValueError(f"version {version!r}: use 1-40 letters, digits, '.', '_' or '-', starting with a letter "
                         "or digit")
    return version


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def class_path(model: torch.nn.Module) -> str:
    """"module:Class" of a model, as `training.fit.train_loop.build_model` reads it."""
    return f"{type(model).__module__}:{type(model).__qualname__}"


def write_bundle(root: str | Path, version: str, space: FeatureSpace, items: pa.Table, two_tower: torch.nn.Module,
                 ranker: torch.nn.Module, metrics: dict, snapshot_id: str, train_config: dict,
                 retrieval: dict | None = None) -> Path:
    """Writes `root/<version>/` and seals it with `manifest.json`; refuses to overwrite an existing bundle.

    Args:
        items: the bundle's catalog snapshot in item-index order (row i = item index i + 1) with its encoded features.
        two_tower, ranker: the retrieval and ranking models; each has `config.to_dict()` and `from_config(dict)`,
            and its class path is recorded so a bundle can hold any retrieval or ranking model.
        retrieval: {"model": registry name, "conditions": ConditionConfig fields}: how serving runs the retrieval
            model, recorded so serving and evaluation run the same settings.
    """
    path = Path(root) / check_version(version)
    if (path / MANIFEST).exists():
        raise BundleError(f"bundle {path} exists already; bundles are immutable, choose another version")
    path.mkdir(parents=True, exist_ok=True)
    torch.save(two_tower.state_dict(), path / "two_tower.pt")
    torch.save(ranker.state_dict(), path / "ranker.pt")
    pq.write_table(items, path / "items.parquet")
    (path / "vocab.json").write_text(space.to_json())
    (path / "config.json").write_text(json.dumps({"two_tower": two_tower.config.to_dict(),
                                                  "ranker": ranker.config.to_dict(),
                                                  "classes": {"two_tower": class_path(two_tower),
                                                              "ranker": class_path(ranker)},
                                                  "retrieval": retrieval or {}, "train": train_config}, indent=2))
    (path / "metrics.json").write_text(json.dumps(metrics, indent=2))
    files = sorted(p.name for p in path.iterdir() if p.name != MANIFEST and p.is_file())
    manifest = {"version": version, "format": BUNDLE_FORMAT, "created_at": iso_utc_now(),
                "data_snapshot": snapshot_id, "files": {f: sha256_of(path / f) for f in files}, "metrics": metrics}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


@dataclass
class Bundle:
    path: Path
    manifest: dict
    space: FeatureSpace
    items: pa.Table  # item-index order, with item_idx, brand_idx, category_idx, price_bucket, popularity
    config: dict

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def metrics(self) -> dict:
        return self.manifest.get("metrics", {})

    def item_features(self) -> ItemFeatures:
        """Lookup arrays indexed by item index, row 0 = padding."""
        cols = [np.concatenate([[0], self.items.column(c).to_numpy()]).astype(np.int64)
                for c in ("item_idx", "brand_idx", "category_idx", "price_bucket")]
        return ItemFeatures(*cols)

    def _model(self, role: str) -> torch.nn.Module:
        from training.fit.train_loop import build_model  # lazy: the model modules import torch-heavy code

        model = build_model(self.config["classes"][role], self.config[role])
        model.load_state_dict(torch.load(self.path / f"{role}.pt", weights_only=True))
        return model.eval()

    def two_tower(self) -> torch.nn.Module:
        """The retrieval model, in eval mode."""
        return self._model("two_tower")

    def ranker(self) -> torch.nn.Module:
        """The ranking model, in eval mode."""
        return self._model("ranker")


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Reads a bundle; with `verify`, every file must match the sha256 in its manifest."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle (train one with `recsys train`)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format", 1) != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format', 1)}, this code reads format {BUNDLE_FORMAT}; "
                          "train the version again")
    for name, digest in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{path}: file {name} listed in the manifest is missing")
        if verify and sha256_of(f) != digest:
            raise BundleError(f"{path}: checksum of {name} does not match the manifest; the bundle was modified")
    items = pq.read_table(path / "items.parquet")
    space = FeatureSpace.from_json((path / "vocab.json").read_text(), items.column("item_id").to_pylist())
    return Bundle(path, manifest, space, items, json.loads((path / "config.json").read_text()))
