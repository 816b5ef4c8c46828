"""Splits: which events a model may learn from, and whom it must recommend what, when.

- `leave_last_out`: per user, the last item they engaged with for the first time is the target; the history is
  everything before it. Train events lose every such user's events from that instant on, so nothing after a
  prediction time is learnt. (A repeat engagement with a known item — the purchase after a click — cannot be a
  target: already-seen items are excluded from every ranking, so it could never be found.)
- `temporal`: one global cutoff at the (1 - test_fraction) quantile of event times; the targets are the new items
  a user engaged with after it (`training.data.examples.eval_set`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.data.examples import eval_set, temporal_split
from training.data.features import (HISTORY_LEN, FeatureSpace, ItemFeatures, build_feature_space, encode_context,
                               engagements_of, histories_at, item_feature_table, time_ms)
from training.metrics import popularity_counts
from training.data.schemas import Shop

NEW_ITEM_QUANTILE = 0.9  # items created in the last 10% of the log's time count as new, like the temporal test part


@dataclass
class RetrievalTask:
    """One data set under one protocol: the training events and, per evaluated user, what to find."""

    dataset: str
    protocol: str  # "leave_last_out" | "temporal"
    space: FeatureSpace  # vocabulary of the whole catalog/users/events (no labels)
    catalog: pa.Table
    users: pa.Table
    train_events: pa.Table  # the only events a model may learn from (EVENTS_SCHEMA)
    item_features: ItemFeatures  # item_feature_table(catalog, space)
    popularity: np.ndarray  # (n_items + 1,) engagement counts in train_events by item index
    user_ids: list[str]  # evaluated users; the arrays below are aligned with them
    hist_items: np.ndarray  # (n, L) int64 at the prediction time, right-aligned
    hist_actions: np.ndarray  # (n, L) int64
    hist_ages: np.ndarray  # (n, L) int64 age buckets at the prediction time
    context: np.ndarray  # (n, C) int64
    targets: list[np.ndarray]  # item indices to find
    seen: list[np.ndarray]  # item indices engaged before the prediction time: excluded from every ranking
    at_ms: np.ndarray  # (n,) int64 prediction time per user
    new_after_ms: int  # items created after this count as new (novelty metrics)
    user_rows: np.ndarray  # (n,) row of each evaluated user in `users`
    hidden: dict = field(default_factory=dict)  # synthetic ground truth (empty for real data)
    examination: str = ""  # synthetic shops: the position bias of their clicks (`Examination.spec`); "" for real data

    def user_inputs(self, rows: slice | np.ndarray = slice(None)
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The four USER_INPUTS arrays (hist_items, hist_actions, hist_ages, context) of the given rows."""
        return self.hist_items[rows], self.hist_actions[rows], self.hist_ages[rows], self.context[rows]

    @property
    def item_created_ms(self) -> np.ndarray:
        """(n_items + 1,) creation time of each item index in ms; row 0 (padding) is 0."""
        out = np.zeros(self.space.n_items + 1, dtype=np.int64)
        out[1:] = time_ms(self.catalog.column("created_at"))
        return out

    def describe(self) -> dict:
        """Sizes of the task for the report."""
        return {"dataset": self.dataset, "protocol": self.protocol, "items": self.space.n_items,
                "users": len(self.users), "evaluated_users": len(self.user_ids),
                "train_events": self.train_events.num_rows,
                "train_engagements": int(self.popularity.sum()),
                "targets": int(sum(len(t) for t in self.targets)), "new_after_ms": int(self.new_after_ms)}


def _user_rows(users: pa.Table, user_ids: list[str]) -> np.ndarray:
    rows = pc.index_in(pa.array(user_ids, type=pa.string()), value_set=users.column("user_id").combine_chunks())
    return rows.to_numpy(zero_copy_only=False).astype(np.int64)


def _new_after(events: pa.Table) -> int:
    return int(np.quantile(time_ms(events.column("timestamp")), NEW_ITEM_QUANTILE))


def _sample_users(n: int, max_users: int | None, seed: int) -> np.ndarray:
    if max_users is None or n <= max_users:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_users, replace=False))


def _home_context(space: FeatureSpace, users: pa.Table, rows: np.ndarray) -> np.ndarray:
    """The user's country and device on the home page, no category and no query.

    The context of the held-out engagement itself would leak it (its search query names the category and brand,
    and a category page's category is the target's), so the request is taken to be a visit to the home page.
    """
    take = pa.array(rows, type=pa.int64())
    n = len(rows)
    return encode_context(space, users.column("country").take(take).to_pylist(),
                          users.column("device").take(take).to_pylist(), ["home"] * n)


def _train_events_before(events: pa.Table, cut_users: list[str], cut_ms: np.ndarray) -> pa.Table:
    """Drops each listed user's events at or after their cut; other users keep every event."""
    pos = pc.index_in(events.column("user_id"), value_set=pa.array(cut_users, type=pa.string()))
    cut = np.append(cut_ms, np.iinfo(np.int64).max)[pc.fill_null(pos, len(cut_users)).to_numpy()]
    return events.filter(pa.array(time_ms(events.column("timestamp")) < cut))


def leave_last_out(shop: Shop, max_users: int | None = None, seed: int = 0, history_len: int = HISTORY_LEN,
                   dataset: str = "", space: FeatureSpace | None = None) -> RetrievalTask:
    """Leave-last-out: each user's last first-time engagement is the target, everything before it the history.

    Users whose target has no engagement before it cannot be evaluated and keep all their events for training.

    Args:
        shop: the data set.
        max_users: evaluate a seeded uniform sample of at most this many users (None: all). Train events lose every
            eligible user's held-out events, sampled or not, so the training data does not depend on the sample.
        seed: the sample's seed.
        history_len: L of the history arrays.
        dataset: name for the report.
        space: the vocabulary to encode with (default: built from the shop). A validation split of a task's
            training events passes the task's own, so that both index items and contexts alike.
    """
    space = space or build_feature_space(shop.catalog, shop.users, shop.events, history_len=history_len)
    eng = engagements_of(shop.events, space)
    # First engagement of each (user, item): engagements are sorted by (user, time), so np.unique's first index is it.
    pair = eng.user_code * (space.n_items + 1) + eng.item_idx
    first = np.sort(np.unique(pair, return_index=True)[1])
    last_first = first[np.r_[eng.user_code[first][1:] != eng.user_code[first][:-1], True]]  # (U,) one per user
    code, at, target = eng.user_code[last_first], eng.time_ms[last_first], eng.item_idx[last_first]
    start = np.searchsorted(eng.user_code, code, side="left")  # the user's first engagement
    end = np.searchsorted(eng.key, eng.key[last_first], side="left")  # first engagement at the target's instant
    eligible = (end > start) & (target > 0)
    code, at, target, start, end = code[eligible], at[eligible], target[eligible], start[eligible], end[eligible]
    train_events = _train_events_before(shop.events, [eng.users[c] for c in code], at)
    pick = _sample_users(len(code), max_users, seed)
    code, at, target, start, end = code[pick], at[pick], target[pick], start[pick], end[pick]
    items, actions, ages = histories_at(eng, code, at, space.history_len)
    user_ids = [eng.users[c] for c in code]
    rows = _user_rows(shop.users, user_ids)
    popularity = popularity_counts(engagements_of(train_events, space).item_idx, space.n_items)
    return RetrievalTask(
        dataset=dataset, protocol="leave_last_out", space=space, catalog=shop.catalog, users=shop.users,
        train_events=train_events, item_features=item_feature_table(shop.catalog, space), popularity=popularity,
        user_ids=user_ids, hist_items=items, hist_actions=actions, hist_ages=ages,
        context=_home_context(space, shop.users, rows), targets=[np.array([t]) for t in target],
        seen=[np.unique(eng.item_idx[s:e]) for s, e in zip(start, end)], at_ms=at.astype(np.int64),
        new_after_ms=_new_after(shop.events), user_rows=rows, hidden=dict(shop.hidden),
        examination=_examination(shop))


def _examination(shop: Shop) -> str:
    """The synthetic shop's position-bias curve as a spec ("" for data without hidden truth)."""
    from training.data.synthetic import Examination

    return Examination.of_meta(shop.meta).spec if shop.hidden else ""


def temporal(shop: Shop, test_fraction: float = 0.1, max_users: int | None = None, seed: int = 0,
             history_len: int = HISTORY_LEN, dataset: str = "", space: FeatureSpace | None = None) -> RetrievalTask:
    """Global temporal split: learn from events before the cutoff, find the new items each user engaged with after.

    Args:
        shop: the data set.
        test_fraction: share of events (by time) after the cutoff.
        max_users: evaluate a seeded uniform sample of at most this many users (None: all).
        seed: the sample's seed.
        history_len: L of the history arrays.
        dataset: name for the report.
        space: the vocabulary to encode with (default: built from the shop; see `leave_last_out`).
    """
    space = space or build_feature_space(shop.catalog, shop.users, shop.events, history_len=history_len)
    split = temporal_split(shop.events, test_fraction)
    ev = eval_set(split, space, max_users=max_users, seed=seed)
    rows = _user_rows(shop.users, ev.user_ids)
    popularity = popularity_counts(engagements_of(split.train, space).item_idx, space.n_items)
    n = len(ev.user_ids)
    return RetrievalTask(
        dataset=dataset, protocol="temporal", space=space, catalog=shop.catalog, users=shop.users,
        train_events=split.train, item_features=item_feature_table(shop.catalog, space), popularity=popularity,
        user_ids=ev.user_ids, hist_items=ev.hist_items, hist_actions=ev.hist_actions, hist_ages=ev.hist_ages,
        context=ev.context, targets=ev.targets, seen=ev.seen, at_ms=np.full(n, split.cutoff_ms, dtype=np.int64),
        new_after_ms=int(split.cutoff_ms), user_rows=rows, hidden=dict(shop.hidden),
        examination=_examination(shop))
