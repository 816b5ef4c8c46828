"""Bundles are sealed by checksums and refused, with an error naming the file, when modified, partial, corrupt or of
another format."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from training.fit.bundle import MANIFEST, BundleError, check_version, load_bundle, sha256_of, write_bundle
from training.data.features import build_feature_space
from training.fit.version import items_table
from training.models.ranker import MultiTaskRanker, RankerConfig
from training.data.synthetic import generate_shop
from training.models.two_tower import TwoTower, TwoTowerConfig

import numpy as np


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    shop = generate_shop("tiny", seed=0)
    space = build_feature_space(shop.catalog, shop.users, shop.events)
    items = items_table(shop.catalog, space, np.ones(space.n_items + 1))
    path = write_bundle(tmp_path_factory.mktemp("b"), "v1", space, items, TwoTower(TwoTowerConfig(**space.sizes)),
                        MultiTaskRanker(RankerConfig(**space.sizes)), {"retrieval": {}}, "snap", {"epochs": 1})
    return path


def test_a_written_bundle_loads_back_with_its_models_and_vocabulary(bundle_dir):
    b = load_bundle(bundle_dir)
    assert b.version == "v1" and b.manifest["data_snapshot"] == "snap"
    assert b.space.n_items == 2000 and len(b.items) == 2000
    assert b.two_tower().config.n_items == 2001 and b.ranker().config.task_weights == (1.0, 0.5, 1.0, 2.0)


def test_a_modified_bundle_file_is_refused(bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "v1"
    shutil.copytree(bundle_dir, copy)
    (copy / "metrics.json").write_text("{}")
    with pytest.raises(BundleError, match="metrics.json"):
        load_bundle(copy)


def test_bundles_are_immutable_and_versions_validated(bundle_dir):
    b = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="immutable"):
        write_bundle(bundle_dir.parent, "v1", b.space, b.items, b.two_tower(), b.ranker(), {}, "s", {})
    with pytest.raises(ValueError, match="version"):
        check_version("bad version/../x")




def test_a_bundle_of_another_format_is_refused_with_a_clear_error(tmp_path):
    import json

    (tmp_path / "manifest.json").write_text(json.dumps({"version": "v0", "files": {}}))  # format 1: no field
    with pytest.raises(BundleError, match="format 1, this code reads format"):
        load_bundle(tmp_path)


def copy_of(bundle_dir, tmp_path):
    return shutil.copytree(bundle_dir, tmp_path / "v1")


def reseal(path, name: str) -> None:
    """Records a file's current checksum, as if the bundle had been written with it (a bug, not a modification)."""
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["files"][name] = sha256_of(path / name)
    (path / MANIFEST).write_text(json.dumps(manifest))


def test_bundle_errors_are_value_errors():
    assert issubclass(BundleError, ValueError)


def test_a_folder_without_manifest_is_refused_naming_it(tmp_path):
    with pytest.raises(BundleError, match=rf"{re.escape(str(tmp_path))}: no manifest.json"):
        load_bundle(tmp_path)


def test_a_truncated_manifest_is_refused_naming_it(bundle_dir, tmp_path):
    copy = copy_of(bundle_dir, tmp_path)
    text = (copy / MANIFEST).read_text()
    (copy / MANIFEST).write_text(text[:len(text) // 2])
    with pytest.raises(BundleError, match=r"v1/manifest.json: cannot be read .*JSONDecodeError"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["two_tower.pt", "ranker.pt", "items.parquet", "vocab.json", "config.json"])
def test_a_missing_file_is_refused_naming_it(bundle_dir, tmp_path, name):
    copy = copy_of(bundle_dir, tmp_path)
    (copy / name).unlink()
    with pytest.raises(BundleError, match=rf"v1/{name}: listed in manifest.json but missing"):
        load_bundle(copy, verify=False)  # refused even without checksums


def test_a_manifest_that_lists_too_few_files_is_refused_as_partial(bundle_dir, tmp_path):
    copy = copy_of(bundle_dir, tmp_path)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["files"]["ranker.pt"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json: lists no \['ranker.pt'\]; a partial bundle"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["two_tower.pt", "ranker.pt", "items.parquet", "vocab.json", "config.json"])
@pytest.mark.parametrize("damage", ["one changed byte", "truncated"])
def test_a_changed_or_truncated_file_is_refused_naming_it(bundle_dir, tmp_path, name, damage):
    copy = copy_of(bundle_dir, tmp_path)
    data = bytearray((copy / name).read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    (copy / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"v1/{name}: checksum does not match manifest.json"):
        load_bundle(copy)


@pytest.mark.parametrize("name", ["items.parquet", "vocab.json", "config.json"])
def test_an_unparsable_file_that_matches_its_checksum_is_refused_naming_it(bundle_dir, tmp_path, name):
    copy = copy_of(bundle_dir, tmp_path)
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[:len(data) // 2])
    reseal(copy, name)
    with pytest.raises(BundleError, match=rf"v1/{name}: cannot be read \(truncated or corrupt\?\)"):
        load_bundle(copy)


def test_truncated_weights_read_without_verification_are_refused_naming_the_file(bundle_dir, tmp_path):
    copy = copy_of(bundle_dir, tmp_path)
    data = (copy / "two_tower.pt").read_bytes()
    (copy / "two_tower.pt").write_bytes(data[:len(data) // 2])
    bundle = load_bundle(copy, verify=False)
    with pytest.raises(BundleError, match=r"v1/two_tower.pt: cannot load the two_tower weights"):
        bundle.two_tower()
