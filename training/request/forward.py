"""The forward index of a version: item index -> attributes (id, brand, category, price, creation time, stock), the
one place serving reads item attributes from. It turns a request's `ItemFilter` into the set of allowed items that
the index search applies inside FAISS, and gives ranking the attributes of the items it returns.

It changes live (`apply`): the catalog's change feed (`training.data.changes`) adds items after the bundle's own
(index n_trained + 1, ...), changes attributes and deletes items, which no filter admits and no answer holds again."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow.compute as pc

from training.data.changes import ItemChange
from training.request.contracts import ItemFilter

_EMBEDDED_BY = ("brand", "category", "price")  # the attributes an item tower reads: a change re-embeds the item


@dataclass(frozen=True)
class ForwardUpdate:
    """What `ForwardIndex.apply` changed: item indices whose vector must be (re)computed, and those deleted."""

    embed: np.ndarray  # (n,) int64, unique
    deleted: np.ndarray  # (m,) int64, unique, none of them in `embed`
    skipped: tuple[str, ...] = ()  # why changes were not applied, e.g. an update of an item the catalog lacks


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
        self.n_trained = len(self.item_ids) - 1  # the bundle's items, which its models have embeddings of
        self.deleted = np.zeros(len(self.item_ids), dtype=bool)
        self._by_value: dict[str, dict[str, np.ndarray]] = {}
        self._row: dict[str, int] | None = None  # item id -> index, built at the first change

    def index_of(self, item_id: str) -> int:
        """The item's index, 0 when the catalog does not have it (or deleted it)."""
        if self._row is None:
            self._row = {item: i for i, item in enumerate(self.item_ids.tolist()) if i}
        i = self._row.get(item_id, 0)
        return 0 if self.deleted[i] else i

    def apply(self, changes: Sequence[ItemChange]) -> ForwardUpdate:
        """Applies changes in their order. An upsert of an item the catalog lacks appends it (a deleted item comes
        back under its old index); an update of such an item is skipped and reported."""
        self.index_of("")  # builds the id map
        embed: set[int] = set()
        deleted: set[int] = set()
        skipped: list[str] = []
        new: list[ItemChange] = []
        gone: set[int] = set()  # items new in this batch and deleted in it too: appended as deleted, never embedded
        for c in changes:
            i = self._row.get(c.item_id, 0)
            if c.op == "delete":
                if i >= len(self.item_ids):
                    gone.add(i)
                    embed.discard(i)
                elif i and not self.deleted[i]:
                    self.deleted[i] = True
                    deleted.add(i)
                    embed.discard(i)
                continue
            if not i:
                if c.op == "update":
                    skipped.append(f"update of {c.item_id}: not in the catalog (upsert it first)")
                    continue
                i = len(self.item_ids) + len(new)  # appended below, with the other new items of this batch
                self._row[c.item_id] = i
                new.append(c)
                embed.add(i)
                continue
            if i >= len(self.item_ids):  # an item new in this batch, changed again
                j = i - len(self.item_ids)
                if i in gone and c.op == "update":
                    skipped.append(f"update of {c.item_id}: deleted (upsert it to bring it back)")
                    continue
                new[j] = c if i in gone else _merged(new[j], c)
                gone.discard(i)
                embed.add(i)
                continue
            if self.deleted[i] and c.op == "update":
                skipped.append(f"update of {c.item_id}: deleted (upsert it to bring it back)")
                continue
            if c.op == "upsert" or any(getattr(c, a) is not None for a in _EMBEDDED_BY):
                embed.add(i)
            self.deleted[i] = False
            deleted.discard(i)
            self._set(i, c)
        if new:
            self._append(new)
            self.deleted[sorted(gone)] = True
        if embed or deleted:
            self._by_value.clear()  # brands and categories may have moved: rebuilt at the next filter
        return ForwardUpdate(np.asarray(sorted(embed), np.int64), np.asarray(sorted(deleted), np.int64),
                             tuple(skipped))

    def _set(self, i: int, c: ItemChange) -> None:
        for attribute, column in (("brand", self.brands), ("category", self.categories), ("price", self.price),
                                  ("created_at", self.created_s)):
            value = getattr(c, attribute)
            if value is not None:
                column[i] = value
        if c.in_stock is not None or c.op == "upsert":
            self.in_stock[i] = True if c.in_stock is None else c.in_stock

    def _append(self, new: list[ItemChange]) -> None:
        n = len(new)
        self.item_ids = np.concatenate([self.item_ids, np.asarray([c.item_id for c in new], dtype=object)])
        self.brands = np.concatenate([self.brands, np.asarray([c.brand for c in new], dtype=object)])
        self.categories = np.concatenate([self.categories, np.asarray([c.category for c in new], dtype=object)])
        self.price = np.concatenate([self.price, [c.price for c in new]])
        self.in_stock = np.concatenate([self.in_stock, [c.in_stock is not False for c in new]])
        self.created_s = np.concatenate([self.created_s, [c.created_at or 0.0 for c in new]])
        self.deleted = np.concatenate([self.deleted, np.zeros(n, dtype=bool)])

    def live(self) -> np.ndarray:
        """(n_items + 1,) bool: the items an answer may hold (row 0, the padding, never)."""
        out = ~self.deleted
        out[0] = False
        return out

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
            return None  # deleted items are out of the index itself
        mask = self.live()
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


def _merged(first: ItemChange, then: ItemChange) -> ItemChange:
    """Two changes of one item new in a batch as one upsert: the later one's attributes win."""
    if then.op == "upsert":
        return then
    return ItemChange("upsert", first.item_id, **{a: getattr(then, a) if getattr(then, a) is not None
                                                   else getattr(first, a) for a in ("brand", "category", "price",
                                                                                     "in_stock", "created_at")})
