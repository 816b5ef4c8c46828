"""Feature encoding shared by training, indexing and serving.

Strings cross every boundary; inside a bundle they become dense integers (0 = padding / unknown). The
`FeatureSpace` is the vocabulary that maps one to the other and is saved with each bundle, so a model is always
read with the vocabulary it was trained with.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.schemas import ACTIONS

ACTION_ID = {a: i + 1 for i, a in enumerate(ACTIONS)}  # 0 = padding
ENGAGEMENTS = ACTIONS[1:]  # every action but a plain view signals interest; views are impressions
HISTORY_LEN = 20  # recent engagements a user tower sees: enough to cover 1-4 interests, cheap to pool per request
N_AGE_BUCKETS = 24  # ages in log2 minutes: bucket 1 is under a minute, bucket 23 is over ~4 years; 0 = padding
QUERY_TOKENS = 4  # the first 4 tokens of a search query enter the context
QUERY_BUCKETS = 1024  # tokens are hashed (crc32) into this many buckets, so no query vocabulary is needed
USER_INPUTS = ("hist_items", "hist_actions", "hist_ages", "context")  # what a user tower or ranker reads, in order
ITEM_LOOKUPS = ("item_brand", "item_category", "item_price")  # training arrays that fill a model's item buffers
CONTEXT_COLUMNS = ("country", "device", "page", "category") + tuple(f"query_{i}" for i in range(QUERY_TOKENS))


@dataclass(frozen=True)
class TableSizes:
    """Embedding table sizes of one feature space (`FeatureSpace.sizes`), padding row 0 included; every model config
    starts with them."""

    n_items: int
    n_brands: int
    n_categories: int
    n_price_buckets: int
    n_countries: int
    n_devices: int
    n_pages: int
    n_actions: int
    n_ages: int
    n_query_buckets: int

    def to_dict(self) -> dict:
        """The config as plain values: what a bundle's config.json records."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TableSizes":
        """The config of `to_dict` (a subclass with nested fields overrides it)."""
        return cls(**d)


def _vocab(values: Sequence[str]) -> dict[str, int]:
    return {v: i + 1 for i, v in enumerate(values)}


@dataclass
class FeatureSpace:
    """Vocabularies and bucket edges of one bundle. Index 0 of every vocabulary is padding / unknown."""

    item_ids: list[str]
    brands: list[str]
    categories: list[str]
    countries: list[str]
    devices: list[str]
    pages: list[str]
    price_edges: list[float]  # n_price_buckets - 1 quantile edges of log1p(price)
    history_len: int = HISTORY_LEN
    _maps: dict[str, dict[str, int]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def sizes(self) -> dict[str, int]:
        """Embedding table sizes, padding row included."""
        return {
            "n_items": len(self.item_ids) + 1,
            "n_brands": len(self.brands) + 1,
            "n_categories": len(self.categories) + 1,
            "n_price_buckets": len(self.price_edges) + 2,
            "n_countries": len(self.countries) + 1,
            "n_devices": len(self.devices) + 1,
            "n_pages": len(self.pages) + 1,
            "n_actions": len(ACTIONS) + 1,
            "n_ages": N_AGE_BUCKETS,
            "n_query_buckets": QUERY_BUCKETS + 1,
        }

    def lookup(self, vocab: str, values: Sequence[str | None]) -> np.ndarray:
        """Maps strings of one vocabulary ("item_ids", "brands", ...) to int64 indices, unknown and None to 0."""
        if vocab not in self._maps:
            self._maps[vocab] = _vocab(getattr(self, vocab))
        m = self._maps[vocab]
        return np.fromiter((m.get(v, 0) for v in values), dtype=np.int64, count=len(values))

    def price_bucket(self, price: np.ndarray) -> np.ndarray:
        """Buckets 1..len(edges)+1 of log1p(price); 0 stays free for unknown."""
        return np.searchsorted(np.asarray(self.price_edges), np.log1p(np.asarray(price, dtype=np.float64))) + 1

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in self.__dict__.items() if not k.startswith("_") and k != "item_ids"})

    @classmethod
    def from_json(cls, text: str, item_ids: list[str]) -> "FeatureSpace":
        return cls(item_ids=item_ids, **json.loads(text))


def build_feature_space(catalog: pa.Table, users: pa.Table, events: pa.Table, n_price_buckets: int = 10,
                        history_len: int = HISTORY_LEN) -> FeatureSpace:
    """Vocabularies from the catalog (items in catalog order), users and events, sorted for determinism."""

    def distinct(*columns: pa.ChunkedArray) -> list[str]:
        out: set[str] = set()
        for col in columns:
            out.update(v for v in pc.unique(col).to_pylist() if v is not None)
        return sorted(out)

    log_price = np.log1p(catalog.column("price").to_numpy())
    qs = np.linspace(0, 1, n_price_buckets + 1)[1:-1]
    return FeatureSpace(
        item_ids=catalog.column("item_id").to_pylist(),
        brands=distinct(catalog.column("brand")),
        categories=distinct(catalog.column("category")),
        countries=distinct(users.column("country"), events.column("country")),
        devices=distinct(users.column("device"), events.column("device")),
        pages=distinct(events.column("page")),
        price_edges=[float(x) for x in np.unique(np.quantile(log_price, qs))] if len(log_price) else [],
        history_len=history_len,
    )


def in_stock(catalog: pa.Table) -> np.ndarray:
    """(n,) bool per catalog row: the "in_stock" attribute, where only "false" means out of stock (absent: in stock)."""
    stock = pc.map_lookup(catalog.column("attributes"), pa.scalar("in_stock"), "first")
    return ~pc.equal(stock, "false").fill_null(False).to_numpy(zero_copy_only=False)


@dataclass
class ItemFeatures:
    """Per-item integer features, row i = item index i (row 0 is padding)."""

    item_idx: np.ndarray  # (n,) int64
    brand_idx: np.ndarray  # (n,) int64
    category_idx: np.ndarray  # (n,) int64
    price_bucket: np.ndarray  # (n,) int64


def item_lookups(feats: ItemFeatures) -> dict[str, np.ndarray]:
    """The `ITEM_LOOKUPS` arrays by item index (row 0 = padding) that every model's `prepare` reads."""
    return dict(zip(ITEM_LOOKUPS, (feats.brand_idx, feats.category_idx, feats.price_bucket)))


def encode_catalog(catalog: pa.Table, space: FeatureSpace) -> ItemFeatures:
    """Encodes catalog rows (any order, new items allowed: their item_idx is 0)."""
    return ItemFeatures(
        item_idx=space.lookup("item_ids", catalog.column("item_id").to_pylist()),
        brand_idx=space.lookup("brands", catalog.column("brand").to_pylist()),
        category_idx=space.lookup("categories", catalog.column("category").to_pylist()),
        price_bucket=space.price_bucket(catalog.column("price").to_numpy()),
    )


def item_feature_table(catalog: pa.Table, space: FeatureSpace) -> ItemFeatures:
    """Item features indexed by item index (row 0 = padding), for the models' lookup buffers."""
    enc = encode_catalog(catalog, space)
    n = space.n_items + 1
    out = ItemFeatures(*(np.zeros(n, dtype=np.int64) for _ in range(4)))
    for name in ("item_idx", "brand_idx", "category_idx", "price_bucket"):
        getattr(out, name)[enc.item_idx] = getattr(enc, name)
    out.item_idx[0] = 0
    return out


@dataclass
class Engagements:
    """A user's engagements (non-view events), sorted by (user, time): the raw material of every history."""

    user_code: np.ndarray  # (n,) int64, index into `users`
    time_ms: np.ndarray  # (n,) int64
    item_idx: np.ndarray  # (n,) int64
    action: np.ndarray  # (n,) int64 action id
    users: list[str]  # user_code -> user_id
    key: np.ndarray  # (n,) int64 = user_code << 42 | time_ms, sorted; used to find histories by search

    @property
    def user_map(self) -> dict[str, int]:
        return {u: i for i, u in enumerate(self.users)}


_TIME_BITS = 42  # ms since epoch fits in 42 bits until the year 2109


def time_ms(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Timestamps (any unit) as int64 milliseconds since the epoch."""
    return pc.cast(col, pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_numpy()


def engagements_of(events: pa.Table, space: FeatureSpace, users: Sequence[str] | None = None) -> Engagements:
    """Non-view events, encoded and sorted by (user, time). `users` fixes the user coding (default: sorted ids)."""
    mask = pc.is_in(events.column("action"), pa.array(list(ENGAGEMENTS)))
    eng = events.filter(mask)
    user_ids = eng.column("user_id").to_pylist()
    users = sorted(set(user_ids)) if users is None else list(users)
    umap = {u: i for i, u in enumerate(users)}
    user_code = np.fromiter((umap.get(u, -1) for u in user_ids), dtype=np.int64, count=len(user_ids))
    t = time_ms(eng.column("timestamp"))
    item = space.lookup("item_ids", eng.column("item_id").to_pylist())
    action = np.fromiter((ACTION_ID[a] for a in eng.column("action").to_pylist()), dtype=np.int64, count=len(eng))
    keep = user_code >= 0
    user_code, t, item, action = user_code[keep], t[keep], item[keep], action[keep]
    key = (user_code << _TIME_BITS) | t
    order = np.argsort(key, kind="stable")
    return Engagements(user_code[order], t[order], item[order], action[order], users, key[order])


def age_bucket(age_ms: np.ndarray) -> np.ndarray:
    """Age of an action at request time -> bucket 1..N_AGE_BUCKETS-1 (log2 of minutes); negative ages count as 0."""
    minutes = np.maximum(np.asarray(age_ms, dtype=np.float64), 0.0) / 60_000.0
    return (1 + np.minimum(np.floor(np.log2(1.0 + minutes)), N_AGE_BUCKETS - 2)).astype(np.int64)


def histories_at(eng: Engagements, user_code: np.ndarray, at_ms: np.ndarray,
                 length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last `length` engagements of each user strictly before a time, right-aligned (most recent last).

    Args:
        eng: engagements sorted by (user, time).
        user_code: (n,) user codes of the queries.
        at_ms: (n,) query times in ms.
        length: L, the history length.
    Returns:
        items, actions and age buckets (see `age_bucket`), each (n, L) int64, 0 where the user has fewer engagements.
    """
    end = np.searchsorted(eng.key, (user_code << _TIME_BITS) | at_ms, side="left")  # first engagement at/after t
    start = np.searchsorted(eng.key, user_code << _TIME_BITS, side="left")  # the user's first engagement
    idx = end[:, None] - np.arange(length, 0, -1)[None, :]  # (n, L)
    valid = idx >= start[:, None]
    idx = np.where(valid, idx, 0)
    items = np.where(valid, eng.item_idx[idx] if len(eng.item_idx) else 0, 0)
    actions = np.where(valid, eng.action[idx] if len(eng.action) else 0, 0)
    ages = np.where(valid, age_bucket(np.asarray(at_ms)[:, None] - eng.time_ms[idx]) if len(eng.time_ms) else 0, 0)
    return items.astype(np.int64), actions.astype(np.int64), ages.astype(np.int64)


def encode_history(space: FeatureSpace, item_ids: Sequence[str], actions: Sequence[str],
                   timestamps: Sequence[float] | None = None,
                   now_s: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One user's recent engagements (oldest first, strings) as right-aligned (1, L) arrays for the towers.

    Args:
        timestamps: unix seconds of each engagement; with `now_s` they give the age buckets (bucket 1 when absent).
    Returns:
        items, actions, age buckets: each (1, L) int64.
    """
    L = space.history_len
    item_ids, actions = list(item_ids)[-L:], list(actions)[-L:]
    items = np.zeros((1, L), dtype=np.int64)
    acts = np.zeros((1, L), dtype=np.int64)
    ages = np.zeros((1, L), dtype=np.int64)
    if item_ids:
        n = len(item_ids)
        items[0, L - n:] = space.lookup("item_ids", item_ids)
        acts[0, L - n:] = [ACTION_ID.get(a, 0) for a in actions]
        if timestamps is not None and now_s is not None:
            ts = np.asarray(list(timestamps)[-L:], dtype=np.float64)
            ages[0, L - n:] = age_bucket((now_s - ts) * 1000.0)
        else:
            ages[0, L - n:] = 1
        acts[items == 0] = 0  # items unknown to this bundle carry no signal
        ages[items == 0] = 0
    return items, acts, ages


def query_tokens(queries: Sequence[str | None]) -> np.ndarray:
    """(n, QUERY_TOKENS) hashed token buckets 1..QUERY_BUCKETS of lower-cased, space-split queries; 0 = none."""
    out = np.zeros((len(queries), QUERY_TOKENS), dtype=np.int64)
    for r, q in enumerate(queries):
        if q:
            for c, tok in enumerate(q.lower().split()[:QUERY_TOKENS]):
                out[r, c] = 1 + zlib.crc32(tok.encode()) % QUERY_BUCKETS
    return out


def encode_context(space: FeatureSpace, country: Sequence[str | None], device: Sequence[str | None],
                   page: Sequence[str | None], category: Sequence[str | None] | None = None,
                   query: Sequence[str | None] | None = None) -> np.ndarray:
    """(n, len(CONTEXT_COLUMNS)) int64 context indices: country, device, page, category, query token buckets."""
    n = len(country)
    cat = space.lookup("categories", category) if category is not None else np.zeros(n, dtype=np.int64)
    q = query_tokens(query) if query is not None else np.zeros((n, QUERY_TOKENS), dtype=np.int64)
    return np.concatenate([np.stack([space.lookup("countries", country), space.lookup("devices", device),
                                     space.lookup("pages", page), cat], axis=1), q], axis=1)
