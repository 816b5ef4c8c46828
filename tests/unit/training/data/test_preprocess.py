"""Preprocessing before evaluation (training/data/preprocess.py): dedup, the iterated k-core, the stated recipe."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from training.data.features import ENGAGEMENTS
from training.data.preprocess import Preprocessing, for_format, preprocess
from training.data.schemas import Shop
from training.data.synthetic import generate_shop


@pytest.fixture(scope="module")
def shop():
    return generate_shop("tiny", 0)


def _engagement_counts(events: pa.Table, column: str) -> np.ndarray:
    eng = events.filter(pc.is_in(events["action"], pa.array(list(ENGAGEMENTS))))
    return np.unique(eng[column].to_numpy(zero_copy_only=False), return_counts=True)[1]


def test_dedup_removes_exactly_the_repeated_rows_and_keeps_time_order(shop):
    doubled = pa.concat_tables([shop.events, shop.events.slice(0, 500)]).sort_by("timestamp")
    out, report = preprocess(Shop(shop.catalog, shop.users, doubled, shop.meta, shop.hidden), Preprocessing(), "parquet")
    assert report["duplicates_removed"] == 500 and out.events.num_rows == shop.events.num_rows
    ts = out.events["timestamp"].cast("int64").to_numpy()
    assert (np.diff(ts) >= 0).all()
    assert out.hidden  # nothing dropped from catalog or users: the synthetic truth stays aligned


def test_k_core_reaches_a_fixed_point_where_every_user_and_item_has_k_engagements(shop):
    out, report = preprocess(shop, Preprocessing(dedup=False, min_user_engagements=3, min_item_engagements=3),
                             "synthetic")
    assert report["k_core_rounds"] >= 1 and report["after"]["events"] < report["before"]["events"]
    assert _engagement_counts(out.events, "user_id").min() >= 3
    assert _engagement_counts(out.events, "item_id").min() >= 3
    assert set(out.catalog["item_id"].to_pylist()) == set(out.events["item_id"].unique().to_pylist())
    assert out.hidden == {}  # rows were dropped: the truth's row alignment is gone, so it is not passed on


def test_the_recipe_per_format_and_its_override(shop):
    assert for_format("movielens").min_user_engagements == 5 and for_format("synthetic").dedup is False
    assert for_format("taobao", k_core=1).min_item_engagements == 1
    with pytest.raises(ValueError, match="--k-core"):
        for_format("taobao", k_core=0)
    with pytest.raises(ValueError, match="no events"):
        preprocess(shop, Preprocessing(min_user_engagements=10_000), "synthetic")
    _, report = preprocess(shop, for_format("movielens"), "movielens")
    assert "rating >= 3" in report["implicit"]
