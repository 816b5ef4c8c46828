"""The catalog change schema: what each op needs, and a changes file's bad row named by file, column and row."""
from __future__ import annotations

import pyarrow as pa
import pytest

from training.data.changes import ItemChange, changes_from_table


def test_each_op_takes_what_it_needs_and_nothing_it_must_not():
    assert ItemChange("upsert", "new-1", "b1", "c1", 9.5).in_stock is None
    ItemChange("update", "i1", in_stock=False)
    ItemChange("delete", "i1")
    for bad, field in [(dict(op="upsert", item_id="x", brand="b"), "needs brand, category and price"),
                       (dict(op="update", item_id="x"), "at least one of"),
                       (dict(op="delete", item_id="x", price=1.0), "takes no attributes"),
                       (dict(op="rename", item_id="x"), "op"),
                       (dict(op="update", item_id="", price=1.0), "item_id"),
                       (dict(op="update", item_id="x", price=float("nan")), "price"),
                       (dict(op="update", item_id="x", price=-1.0), "price"),
                       (dict(op="update", item_id="x", in_stock=1), "in_stock"),
                       (dict(op="update", item_id="x", brand="b" * 129), "brand")]:
        with pytest.raises(ValueError, match=field):
            ItemChange(**bad)
    with pytest.raises(ValueError, match="unknown fields"):
        ItemChange.from_dict({"op": "delete", "item_id": "x", "colour": "red"})
    assert ItemChange.from_dict(ItemChange("update", "i1", price=2.0).to_dict()) == ItemChange("update", "i1", price=2.0)


def test_a_changes_table_becomes_changes_and_a_bad_row_is_named():
    table = pa.table({"op": ["upsert", "update", "delete"], "item_id": ["n1", "i2", "i3"],
                      "brand": ["b", None, None], "category": ["c", None, None], "price": [1.0, 2.0, None],
                      "in_stock": [None, False, None]})
    assert changes_from_table(table, "f.parquet") == [ItemChange("upsert", "n1", "b", "c", 1.0),
                                                      ItemChange("update", "i2", price=2.0, in_stock=False),
                                                      ItemChange("delete", "i3")]
    with pytest.raises(ValueError, match=r"f.parquet: row 1: .*needs brand, category and price"):
        changes_from_table(pa.table({"op": ["delete", "upsert"], "item_id": ["a", "b"]}), "f.parquet")
    with pytest.raises(ValueError, match=r"f.parquet: column 'price' must be double"):
        changes_from_table(pa.table({"op": ["update"], "item_id": ["a"], "price": ["cheap"]}), "f.parquet")
    with pytest.raises(ValueError, match=r"f.parquet: missing column\(s\) \['item_id'\]"):
        changes_from_table(pa.table({"op": ["delete"]}), "f.parquet")
    with pytest.raises(ValueError, match=r"unknown column\(s\) \['colour'\]"):
        changes_from_table(pa.table({"op": ["delete"], "item_id": ["a"], "colour": ["red"]}), "f.parquet")
