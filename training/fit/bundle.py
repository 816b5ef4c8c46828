"""Bundles: one immutable model version on disk (`bundles/<version>/`), verified by checksums when read."""
from __future__ import annotations

import hashlib
import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

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
# What `write_bundle` writes; a manifest that lists fewer belongs to a partial bundle.
BUNDLE_FILES = ("config.json", "items.parquet", "metrics.json", "ranker.pt", "two_tower.pt", "vocab.json")
T = TypeVar("T")


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupt or does not match its manifest; the message names the file."""


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
        file = self.path / f"{role}.pt"
        try:
            model.load_state_dict(torch.load(file, weights_only=True))
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:  # torch's words for a bad file
            raise BundleError(f"{file}: cannot load the {role} weights (truncated or corrupt?): {exc}") from exc
        return model.eval()

    def two_tower(self) -> torch.nn.Module:
        """The retrieval model, in eval mode."""
        return self._model("two_tower")

    def ranker(self) -> torch.nn.Module:
        """The ranking model, in eval mode."""
        return self._model("ranker")


def _parse(file: Path, parse: Callable[[Path], T]) -> T:
    try:
        return parse(file)
    except (ValueError, KeyError, TypeError, OSError, pa.ArrowException) as exc:  # JSON, Arrow and field errors
        raise BundleError(f"{file}: cannot be read (truncated or corrupt?): {type(exc).__name__}: {exc}") from exc


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Reads a bundle; with `verify`, every file must match the sha256 in its manifest.

    Raises:
        BundleError: the manifest is missing or unreadable, of another format, or lists fewer files than a bundle
            holds; a listed file is missing, does not match its checksum, or cannot be parsed. The message names
            the file.
    """
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; not a bundle (train one with `recsys train`)")
    manifest = _parse(manifest_file, lambda f: json.loads(f.read_text()))
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files", {}), dict):
        raise BundleError(f"{manifest_file}: expected a JSON object with a 'files' object of sha256 digests")
    if manifest.get("format", 1) != BUNDLE_FORMAT:
        raise BundleError(f"{path}: bundle format {manifest.get('format', 1)}, this code reads format {BUNDLE_FORMAT}; "
                          "train the version again")
    files = manifest.get("files", {})
    unlisted = [name for name in BUNDLE_FILES if name not in files]
    if unlisted:
        raise BundleError(f"{manifest_file}: lists no {unlisted}; a partial bundle, train the version again")
    for name, digest in files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"{f}: listed in {MANIFEST} but missing; a partial bundle, train the version again")
        if verify and sha256_of(f) != digest:
            raise BundleError(f"{f}: checksum does not match {MANIFEST}; the bundle was modified or truncated")
    items = _parse(path / "items.parquet", pq.read_table)
    item_ids = _parse(path / "items.parquet", lambda f: items.column("item_id").to_pylist())
    space = _parse(path / "vocab.json", lambda f: FeatureSpace.from_json(f.read_text(), item_ids))
    config = _parse(path / "config.json", lambda f: json.loads(f.read_text()))
    return Bundle(path, manifest, space, items, config)
