"""The catalog's change schema: one item created, changed or deleted (`ItemChange`), as `POST /admin/items` takes
it, the change log stores it (`indexing.changes`) and every live version applies it (`indexing.live`)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

OPS = ("upsert", "update", "delete")
MAX_TEXT = 128  # item ids, brands and categories
ATTRIBUTES = ("brand", "category", "price", "in_stock", "created_at")
# `recsys items apply FILE.parquet`: one change a row; attributes may be null (keep the current value)
CHANGES_SCHEMA = pa.schema([("op", pa.string()), ("item_id", pa.string()), ("brand", pa.string()),
                            ("category", pa.string()), ("price", pa.float64()), ("in_stock", pa.bool_()),
                            ("created_at", pa.float64())])


@dataclass(frozen=True)
class ItemChange:
    """One item's change: `upsert` creates the item or replaces its attributes (brand, category and price required;
    in stock unless said otherwise), `update` changes the attributes given of an item the catalog has (None keeps
    the current value), `delete` removes it from every index and every answer."""

    op: str
    item_id: str
    brand: str | None = None
    category: str | None = None
    price: float | None = None
    in_stock: bool | None = None
    created_at: float | None = None  # unix seconds when the item was created; a new item defaults to the write time

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op: one of {list(OPS)}, got {self.op!r}")
        for name in ("item_id", "brand", "category"):
            value = getattr(self, name)
            if value is None and name != "item_id":
                continue
            if not isinstance(value, str) or not value or len(value) > MAX_TEXT:
                raise ValueError(f"{name}: a non-empty string of at most {MAX_TEXT} characters, got {value!r}")
        for name in ("price", "created_at"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name}: a finite number >= 0, got {value!r}")
        if self.in_stock is not None and not isinstance(self.in_stock, bool):
            raise ValueError(f"in_stock: true or false, got {self.in_stock!r}")
        if self.op == "upsert" and None in (self.brand, self.category, self.price):
            raise ValueError(f"item {self.item_id}: an upsert needs brand, category and price (`update` changes "
                             "some attributes of an item the catalog has)")
        if self.op == "update" and all(getattr(self, n) is None for n in ATTRIBUTES):
            raise ValueError(f"item {self.item_id}: an update needs at least one of {list(ATTRIBUTES)}")
        if self.op == "delete" and any(getattr(self, n) is not None for n in ATTRIBUTES):
            raise ValueError(f"item {self.item_id}: a delete takes no attributes")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: Any) -> "ItemChange":
        if not isinstance(d, dict):
            raise ValueError(f"a change must be an object, got {type(d).__name__}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown fields {sorted(unknown)}; expected {list(cls.__dataclass_fields__)}")
        if "op" not in d or "item_id" not in d:
            raise ValueError("op and item_id are required")
        return cls(**d)


def changes_from_table(table: pa.Table, name: str) -> list[ItemChange]:
    """The rows of a changes table (`CHANGES_SCHEMA`'s columns; op and item_id required) as changes.

    Raises:
        ValueError: naming `name`, the column and the row of the first bad value.
    """
    missing = [c for c in ("op", "item_id") if c not in table.column_names]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; expected {CHANGES_SCHEMA.names}")
    unknown = [c for c in table.column_names if c not in CHANGES_SCHEMA.names]
    if unknown:
        raise ValueError(f"{name}: unknown column(s) {unknown}; expected {CHANGES_SCHEMA.names}")
    columns = {}
    for column in table.column_names:
        target = CHANGES_SCHEMA.field(column).type
        try:
            columns[column] = table.column(column).cast(target).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{name}: column {column!r} must be {target}: {e}") from e
    out = []
    for row in range(table.num_rows):
        values = {c: v[row] for c, v in columns.items() if v[row] is not None}
        try:
            out.append(ItemChange.from_dict(values))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{name}: row {row}: {e}") from e
    return out
