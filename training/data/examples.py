"""Training and evaluation examples from an event log: temporal split, two-tower pairs, labelled impressions.

Everything is vectorised over numpy arrays so the demo shop's ~1.5M events encode in seconds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from training.data.features import (ACTION_ID, CONTEXT_COLUMNS, Engagements, FeatureSpace, encode_context, engagements_of,
                               histories_at, time_ms)

TASKS = ("click", "wishlist", "add_to_cart", "purchase")  # the ranker's heads: one label column each
LABEL_WINDOW_MS = 3_600_000  # an action on a shown item within an hour of the view counts as that view's outcome


@dataclass
class TemporalSplit:
    train: pa.Table  # events before the cutoff
    test: pa.Table  # events at or after the cutoff
    cutoff_ms: int


def temporal_split(events: pa.Table, test_fraction: float = 0.1) -> TemporalSplit:
    """Global time cutoff at the (1 - test_fraction) quantile of event times: train on the past only."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    t = time_ms(events.column("timestamp"))
    cutoff = int(np.quantile(t, 1.0 - test_fraction))
    before = pa.array(t < cutoff)
    return TemporalSplit(events.filter(before), events.filter(pc.invert(before)), cutoff)


@dataclass
class TowerExamples:
    """(user state, engaged item) pairs: one per engagement, the history being the user's earlier engagements."""

    hist_items: np.ndarray  # (n, L) int64
    hist_actions: np.ndarray  # (n, L) int64
    hist_ages: np.ndarray  # (n, L) int64 age buckets at the engagement's time
    context: np.ndarray  # (n, len(CONTEXT_COLUMNS)) int64
    target: np.ndarray  # (n,) int64 item index
    user_code: np.ndarray  # (n,) int64 user of the example (code in the engagements' user list)
    time_ms: np.ndarray  # (n,) int64 time of the engagement

    def __len__(self) -> int:
        return len(self.target)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def context_of(events: pa.Table, space: FeatureSpace, item_category: np.ndarray | None = None) -> np.ndarray:
    """Request context of each event: country, device, page, query tokens, and on a category page its category.

    Events carry no category column; on a category page every shown item is of the page's category, so with
    `item_category` ((n_items + 1,) category index by item index) the item's category stands for the page's.
    """
    page = events.column("page").to_pylist()
    ctx = encode_context(space, events.column("country").to_pylist(), events.column("device").to_pylist(), page,
                         query=events.column("query").to_pylist())
    if item_category is not None:
        on_category_page = np.array([p == "category" for p in page], dtype=bool)
        item = space.lookup("item_ids", events.column("item_id").to_pylist())
        ctx[:, 3] = np.where(on_category_page, item_category[item], 0)
    return ctx


def tower_examples(events: pa.Table, space: FeatureSpace, item_category: np.ndarray | None = None) -> TowerExamples:
    """One example per engagement on a known item, with the user's previous `history_len` engagements."""
    eng = engagements_of(events, space)
    mask = pc.is_in(events.column("action"), pa.array(list(ACTION_ID)[1:]))
    rows = events.filter(mask)
    umap = eng.user_map
    user_code = np.fromiter((umap[u] for u in rows.column("user_id").to_pylist()), dtype=np.int64, count=len(rows))
    t = time_ms(rows.column("timestamp"))
    target = space.lookup("item_ids", rows.column("item_id").to_pylist())
    items, actions, ages = histories_at(eng, user_code, t, space.history_len)
    keep = target > 0
    return TowerExamples(items[keep], actions[keep], ages[keep], context_of(rows, space, item_category)[keep],
                         target[keep], user_code[keep], t[keep])


@dataclass
class Impressions:
    """Shown items (view events) with the actions that followed: the ranker's training data."""

    hist_items: np.ndarray  # (n, L)
    hist_actions: np.ndarray  # (n, L)
    hist_ages: np.ndarray  # (n, L) age buckets at the view's time
    context: np.ndarray  # (n, len(CONTEXT_COLUMNS))
    item: np.ndarray  # (n,)
    position: np.ndarray  # (n,) int64, -1 when not logged
    labels: np.ndarray  # (n, len(TASKS)) float32
    time_ms: np.ndarray  # (n,) int64 time of the view

    def __len__(self) -> int:
        return len(self.item)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)

    def subset(self, mask: np.ndarray) -> "Impressions":
        return Impressions(**{k: v[mask] for k, v in self.as_dict().items()})


def impressions(events: pa.Table, space: FeatureSpace, history: Engagements, max_rows: int | None = None,
                seed: int = 0, item_category: np.ndarray | None = None) -> Impressions:
    """Labels every view with the actions (click, wishlist, add to cart, purchase) on that item within the hour.

    Args:
        events: events to take views from (and the outcomes of those views).
        history: engagements to build histories from (the training period's, so nothing leaks from the future).
        max_rows: keep a uniform sample of at most this many views (None keeps all).
        item_category: see `context_of`.
    """
    cols = ["user_id", "item_id", "timestamp", "action", "position", "country", "device", "page", "query"]
    df = events.select(cols).to_pandas()
    df["t"] = time_ms(events.column("timestamp"))
    views = df[df["action"] == "view"]
    if max_rows is not None and len(views) > max_rows:
        views = views.sample(n=max_rows, random_state=seed)
    views = views.sort_values("t", kind="stable").reset_index(drop=True)
    labels = np.zeros((len(views), len(TASKS)), dtype=np.float32)
    for j, task in enumerate(TASKS):
        outcome = df[df["action"] == task][["user_id", "item_id", "t"]].sort_values("t", kind="stable")
        outcome = outcome.rename(columns={"t": "t_outcome"})
        merged = pd.merge_asof(views[["user_id", "item_id", "t"]], outcome, left_on="t", right_on="t_outcome",
                               by=["user_id", "item_id"], direction="forward", tolerance=LABEL_WINDOW_MS)
        labels[:, j] = merged["t_outcome"].notna().to_numpy()
    umap = history.user_map
    user_code = np.fromiter((umap.get(u, -1) for u in views["user_id"]), dtype=np.int64, count=len(views))
    t = views["t"].to_numpy(dtype=np.int64)
    items, actions, ages = histories_at(history, np.maximum(user_code, 0), t, space.history_len)
    for a in (items, actions, ages):
        a[user_code < 0] = 0
    item = space.lookup("item_ids", views["item_id"].tolist())
    ctx = context_of(pa.Table.from_pandas(views[["item_id", "country", "device", "page", "query"]],
                                          preserve_index=False), space, item_category)
    position = views["position"].fillna(-1).to_numpy(dtype=np.int64)
    keep = item > 0
    return Impressions(items[keep], actions[keep], ages[keep], ctx[keep], item[keep], position[keep], labels[keep],
                       t[keep])


@dataclass
class EvalSet:
    """Users with history before the cutoff and new engagements after it."""

    user_ids: list[str]
    hist_items: np.ndarray  # (n, L) at the cutoff
    hist_actions: np.ndarray  # (n, L)
    hist_ages: np.ndarray  # (n, L) age buckets at the cutoff
    context: np.ndarray  # (n, len(CONTEXT_COLUMNS)): the user's context at their first test event
    targets: list[np.ndarray]  # item indices engaged with after the cutoff and never before
    seen: list[np.ndarray]  # item indices engaged with before the cutoff (excluded from the ranking)


def eval_set(split: TemporalSplit, space: FeatureSpace, max_users: int | None = 5000, seed: int = 0) -> EvalSet:
    """The held-out protocol: rank the whole catalog for each user at the cutoff; already-seen items excluded."""
    train_eng = engagements_of(split.train, space)
    test_eng = engagements_of(split.test, space, users=train_eng.users)
    seen_by_user = np.split(train_eng.item_idx, np.searchsorted(train_eng.user_code, np.arange(1, len(train_eng.users))))
    t_start = np.searchsorted(test_eng.user_code, np.arange(len(train_eng.users) + 1))
    candidates = []
    for u in range(len(train_eng.users)):
        future = np.unique(test_eng.item_idx[t_start[u]:t_start[u + 1]])
        seen = np.unique(seen_by_user[u])
        future = np.setdiff1d(future[future > 0], seen)
        if len(future) and len(seen):
            candidates.append((u, future, seen))
    rng = np.random.default_rng(seed)
    if max_users is not None and len(candidates) > max_users:
        pick = np.sort(rng.choice(len(candidates), size=max_users, replace=False))
        candidates = [candidates[i] for i in pick]
    codes = np.array([c[0] for c in candidates], dtype=np.int64)
    items, actions, ages = histories_at(train_eng, codes, np.full(len(codes), split.cutoff_ms, dtype=np.int64),
                                        space.history_len)
    # Context: the user's first event after the cutoff (their country/device; the page they came back to).
    test_df = split.test.select(["user_id", "country", "device", "page"]).to_pandas().drop_duplicates("user_id")
    first = test_df.set_index("user_id")
    users = [train_eng.users[c] for c in codes]
    ctx = (encode_context(space, first.loc[users, "country"].tolist(), first.loc[users, "device"].tolist(),
                          first.loc[users, "page"].tolist()) if users
           else np.zeros((0, len(CONTEXT_COLUMNS)), dtype=np.int64))
    return EvalSet(users, items, actions, ages, ctx, [c[1] for c in candidates], [c[2] for c in candidates])


def add_sampled_negatives(imp: Impressions, n_items: int, ratio: float, seed: int) -> Impressions:
    """Adds `ratio` unshown, uniformly drawn items per impression as negatives (all labels 0, position unknown),
    with the impression's history and context, keeping the time order.

    Logged views are all from the user's current interest or globally popular, but a ranker re-ranks retrieval
    candidates from the whole catalog: without unshown negatives it never learns that an off-interest item is bad
    (exposure bias), and re-ranking then undoes retrieval's order."""
    rng = np.random.default_rng(seed)
    src = np.sort(rng.choice(len(imp), size=int(len(imp) * ratio), replace=ratio > 1.0))
    neg = Impressions(imp.hist_items[src], imp.hist_actions[src], imp.hist_ages[src], imp.context[src],
                      rng.integers(1, n_items + 1, len(src)), np.full(len(src), -1, np.int64),
                      np.zeros((len(src), len(TASKS)), np.float32), imp.time_ms[src])
    both = Impressions(*(np.concatenate([a, b]) for a, b in zip(imp.as_dict().values(), neg.as_dict().values())))
    return both.subset(np.argsort(both.time_ms, kind="stable"))
