"""The forward index of a version: item index -> attributes (id, brand, category, price, creation time, stock), the
one place serving reads item attributes from. It turns a request's `ItemFilter` into the set of allowed items that
the index search applies inside FAISS, and gives ranking the attributes of the items it returns."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from training.request.contracts import ItemFilter


class ForwardIndex:
    """Per-item attribute arrays, row i = item index i (row 0 = padding, never allowed)."""

    def __init__(self, items: Any) -> None:
        """items: a bundle's `items.parquet` table (row r = item index r + 1)."""
        def column(name: str, pad: Any) -> np.ndarray:
            values = items.column(name).to_numpy(zero_copy_only=False)
            return np.concatenate([np.asarray([pad], dtype=values.dtype), values])

        self.item_ids = np.asarray([""] + items.column("item_id").to_pylist(), dtype=object)
        self.brands = np.asarray([""] + items.column("brand").to_pylist(), dtype=object)
        self.categories = np.asarray([""] + items.column("category").to_pylist(), dtype=object)
        self.price = column("price", np.nan).astype(np.float64)
        self.in_stock = column("in_stock", False).astype(bool)
        self.created_s = np.concatenate([[0.0], pc.cast(items.column("created_at"), "int64").to_numpy() / 1000.0])
        self._by_value: dict[str, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.item_ids) - 1

    def _rows_of(self, attribute: str, values: tuple[str, ...]) -> np.ndarray:
        """(n + 1,) bool: items whose brand or category is one of `values` (unknown values match nothing)."""
        index = self._by_value.get(attribute)
        if index is None:  # value -> item indices, built once per attribute
            column = getattr(self, attribute)
            order = np.argsort(column[1:], kind="stable") + 1
            keys, starts = np.unique(column[order], return_index=True)
            ends = np.append(starts[1:], len(order))
            index = self._by_value[attribute] = {k: order[s:e] for k, s, e in zip(keys, starts, ends)}
        out = np.zeros(len(self.item_ids), dtype=bool)
        for v in values:
            out[index.get(v, np.zeros(0, np.int64))] = True
        return out

    def allowed(self, f: ItemFilter) -> np.ndarray | None:
        """(n_items + 1,) bool mask of the items a filter admits; None when it admits everything."""
        if f.is_empty():
            return None
        mask = np.ones(len(self.item_ids), dtype=bool)
        mask[0] = False
        if f.categories:
            mask &= self._rows_of("categories", f.categories)
        if f.brands:
            mask &= self._rows_of("brands", f.brands)
        if f.exclude_brands:
            mask &= ~self._rows_of("brands", f.exclude_brands)
        if f.in_stock is not None:
            mask &= self.in_stock == f.in_stock
        if f.price_min is not None:
            mask &= self.price >= f.price_min
        if f.price_max is not None:
            mask &= self.price <= f.price_max
        return mask
