"""Config errors name the bad key."""
from __future__ import annotations

import pytest

from cluster.config import load_config


def test_config_unknown_keys_and_wrong_types_are_errors_naming_the_key(tmp_path):
    (tmp_path / "a.yaml").write_text("train: {num_workerz: 2}\n")
    with pytest.raises(ValueError, match="num_workerz"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("index: {n_shards: two}\n")
    with pytest.raises(ValueError, match="index.n_shards"):
        load_config(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("policy: {max_brand_run: 0}\n")
    with pytest.raises(ValueError, match="max_brand_run"):
        load_config(tmp_path / "c.yaml")
    assert load_config("tiny").data.size == "tiny"


def test_index_type_and_layout_come_from_the_config_and_bad_values_name_the_field(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("index: {n_shards: 3, ann: {kind: hnsw, ef_search: 200}}\nserving: {index_layout: sharded}\n")
    cfg = load_config(p)
    assert (cfg.index.n_shards, cfg.index.ann.kind, cfg.index.ann.ef_search) == (3, "hnsw", 200)
    assert cfg.serving.index_layout == "sharded"
    for text, field in (("index: {ann: {kind: nope}}", "config index.ann"),
                        ("index: {ann: {nprobe: 0}}", "nprobe"),
                        ("serving: {index_layout: nearby}", "index_layout")):
        p.write_text(text)
        with pytest.raises(ValueError, match=field):
            load_config(p)


def test_every_built_in_config_loads():
    from cluster.config import CONFIG_DIR

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"demo", "tiny", "loop", "large"} <= set(names)
    for name in names:
        load_config(name)
    large = load_config("large")
    assert large.data.size == "large" and large.index.ann.kind == "ivf_flat" and large.train.num_workers == 1
