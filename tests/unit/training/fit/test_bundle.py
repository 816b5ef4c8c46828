"""Bundles are sealed by checksums and refused when modified or of another format."""
from __future__ import annotations

import pytest

from training.fit.bundle import BundleError, check_version, load_bundle, write_bundle
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
