"""Preprocessing of a loaded data set before evaluation: duplicates, the k-core, and what counts as an engagement.

Published figures on public data sets differ as much by preprocessing as by model, so the harness applies one
stated recipe per format and writes it, with what each step removed, into the report:

- dedup: identical (user, item, action, timestamp) rows are one event (log exports repeat rows);
- implicit threshold: which events count as engagements. The loaders map explicit feedback onto actions
  (`training.data.movielens`: ratings 1-2 -> view, 3 -> click, 4 -> add_to_cart, 5 -> purchase) and every action
  but a view is an engagement (`training.data.features.ENGAGEMENTS`), so on MovieLens a rating of 3 or more counts;
- k-core: users and items with fewer than k engagements are dropped, repeatedly, until every remaining user and
  item has at least k (the usual 5-core of Taobao and RetailRocket studies; MovieLens users have 20+ ratings
  already, so there it removes only rare films).

Views stay in the events (the ranking section learns from them); the k-core counts engagements only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.features import ENGAGEMENTS
from training.data.schemas import Shop

IMPLICIT = {"movielens": "rating >= 3 (3 -> click, 4 -> add_to_cart, 5 -> purchase; 1-2 are views)",
            "taobao": "pv is a view; cart, fav and buy are engagements",
            "retailrocket": "view is a view; addtocart and transaction are engagements",
            "synthetic": "every action but a view", "parquet": "every action but a view"}


@dataclass(frozen=True)
class Preprocessing:
    dedup: bool = True
    min_user_engagements: int = 1  # the k-core's k for users (1: no core)
    min_item_engagements: int = 1  # and for items

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS = {"movielens": Preprocessing(min_user_engagements=5, min_item_engagements=5),
            "taobao": Preprocessing(min_user_engagements=5, min_item_engagements=5),
            "retailrocket": Preprocessing(min_user_engagements=5, min_item_engagements=5),
            "synthetic": Preprocessing(dedup=False), "parquet": Preprocessing()}


def for_format(fmt: str, k_core: int | None = None) -> Preprocessing:
    """The format's recipe; `k_core` overrides both k's (1 turns the core off)."""
    base = DEFAULTS.get(fmt, Preprocessing())
    if k_core is None:
        return base
    if k_core < 1:
        raise ValueError(f"--k-core must be >= 1, got {k_core}")
    return replace(base, min_user_engagements=k_core, min_item_engagements=k_core)


def _k_core(events: pa.Table, k_user: int, k_item: int) -> tuple[pa.Table, int]:
    """Events of users and items with at least k engagements each, iterated to a fixed point; and the rounds run."""
    rounds = 0
    while True:
        is_eng = pc.is_in(events["action"], pa.array(list(ENGAGEMENTS))).to_numpy(zero_copy_only=False)
        bad_users, bad_items = (_below(events[c].to_numpy(zero_copy_only=False), is_eng, k)
                                for c, k in (("user_id", k_user), ("item_id", k_item)))
        if not len(bad_users) and not len(bad_items):
            return events, rounds
        rounds += 1
        keep = pc.and_(pc.invert(pc.is_in(events["user_id"], pa.array(bad_users.tolist(), type=pa.string()))),
                       pc.invert(pc.is_in(events["item_id"], pa.array(bad_items.tolist(), type=pa.string()))))
        events = events.filter(keep)


def _below(ids: np.ndarray, is_engagement: np.ndarray, k: int) -> np.ndarray:
    """The ids with fewer than k engagements among their events (views only: none)."""
    values, inverse = np.unique(ids, return_inverse=True)
    return values[np.bincount(inverse, weights=is_engagement, minlength=len(values)) < k]


def preprocess(shop: Shop, recipe: Preprocessing, fmt: str) -> tuple[Shop, dict]:
    """The shop after the recipe, and what the report states: the recipe, the implicit threshold, the counts.

    After a k-core, catalog items below k engagements and users left without events are dropped too, so the
    catalog that is ranked is the core's; dedup alone keeps the catalog (an item nobody engaged with is still one).
    """
    before = {"events": shop.events.num_rows, "users": shop.users.num_rows, "items": shop.catalog.num_rows}
    events = shop.events
    if recipe.dedup:
        events = _dedup(events, ["user_id", "item_id", "action", "timestamp"])
    deduped = events.num_rows
    rounds = 0
    if recipe.min_user_engagements > 1 or recipe.min_item_engagements > 1:
        events, rounds = _k_core(events, recipe.min_user_engagements, recipe.min_item_engagements)
    catalog, users = shop.catalog, shop.users
    if rounds:  # the ranked catalog is the core's: items below k go, and users left without any event
        engaged = events.filter(pc.is_in(events["action"], pa.array(list(ENGAGEMENTS))))
        catalog = catalog.filter(pc.is_in(catalog["item_id"], engaged["item_id"].unique()))
        users = users.filter(pc.is_in(users["user_id"], events["user_id"].unique()))
    after = {"events": events.num_rows, "users": users.num_rows, "items": catalog.num_rows}
    report = {"recipe": recipe.to_dict(), "implicit": IMPLICIT.get(fmt, IMPLICIT["parquet"]),
              "duplicates_removed": before["events"] - deduped, "k_core_rounds": rounds,
              "before": before, "after": after}
    if after["events"] == 0:
        raise ValueError(f"preprocessing left no events (k-core {recipe.min_user_engagements}/"
                         f"{recipe.min_item_engagements} of {before['events']:,} events); lower --k-core")
    # The hidden truth is aligned with the catalog and users rows: it survives only when none was dropped.
    hidden = shop.hidden if catalog.num_rows == shop.catalog.num_rows and users.num_rows == shop.users.num_rows else {}
    return Shop(catalog=catalog, users=users, events=events, meta=shop.meta, hidden=hidden), report


def _dedup(events: pa.Table, keys: list[str]) -> pa.Table:
    """The first row of each distinct key, in the original (time) order."""
    codes = np.zeros(events.num_rows, dtype=np.int64)
    for k in keys:
        col = events[k]
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.int64())
        enc = pc.dictionary_encode(col.combine_chunks()) if not pa.types.is_integer(col.type) else None
        values = (enc.indices.to_numpy(zero_copy_only=False).astype(np.int64) if enc is not None
                  else col.to_numpy().astype(np.int64))
        values = np.unique(values, return_inverse=True)[1]
        codes = codes * (int(values.max(initial=0)) + 1) + values
        codes = np.unique(codes, return_inverse=True)[1]  # keep the combined code small
    first = np.sort(np.unique(codes, return_index=True)[1])
    return events if len(first) == events.num_rows else events.take(pa.array(first))
