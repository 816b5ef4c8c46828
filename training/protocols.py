"""Evaluation protocols: which events a model may learn from, and whom it must recommend what, when.

- `leave_last_out`: per user, the last item they engaged with for the first time is the target; the history is
  everything before it. Train events lose every such user's events from that instant on, so nothing after a
  prediction time is learnt. (A repeat engagement with a known item — the purchase after a click — cannot be a
  target: already-seen items are excluded from every ranking, so it could never be found.)
- `temporal`: one global cutoff at the (1 - test_fraction) quantile of event times; the targets are the new items
  a user engaged with after it (`training.examples.eval_set`).
- `sampled_ranking_metrics`: the target ranked among 100 sampled negatives. **Only for comparison with papers**:
  sampled metrics can rank models differently from full ranking (Krichene & Rendle, KDD 2020); the full-catalog
  ranking is the protocol this project decides by.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from training.examples import eval_set, temporal_split
from training.features import (HISTORY_LEN, FeatureSpace, ItemFeatures, build_feature_space, encode_context,
                               engagements_of, histories_at, item_feature_table, time_ms)
from training.metrics import popularity_counts
from training.schemas import Shop

NEW_ITEM_QUANTILE = 0.9  # items created in the last 10% of the log's time count as new, like the temporal test part
SAMPLERS = ("popularity", "uniform")


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
                   dataset: str = "") -> RetrievalTask:
    """Leave-last-out: each user's last first-time engagement is the target, everything before it the history.

    Users whose target has no engagement before it cannot be evaluated and keep all their events for training.

    Args:
        shop: the data set.
        max_users: evaluate a seeded uniform sample of at most this many users (None: all). Train events lose every
            eligible user's held-out events, sampled or not, so the training data does not depend on the sample.
        seed: the sample's seed.
        history_len: L of the history arrays.
        dataset: name for the report.
    """
    space = build_feature_space(shop.catalog, shop.users, shop.events, history_len=history_len)
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
        new_after_ms=_new_after(shop.events), user_rows=rows, hidden=dict(shop.hidden))


def temporal(shop: Shop, test_fraction: float = 0.1, max_users: int | None = None, seed: int = 0,
             history_len: int = HISTORY_LEN, dataset: str = "") -> RetrievalTask:
    """Global temporal split: learn from events before the cutoff, find the new items each user engaged with after.

    Args:
        shop: the data set.
        test_fraction: share of events (by time) after the cutoff.
        max_users: evaluate a seeded uniform sample of at most this many users (None: all).
        seed: the sample's seed.
        history_len: L of the history arrays.
        dataset: name for the report.
    """
    space = build_feature_space(shop.catalog, shop.users, shop.events, history_len=history_len)
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
        new_after_ms=int(split.cutoff_ms), user_rows=rows, hidden=dict(shop.hidden))


ScoresFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows (n,), items (n, 1 + N)) -> scores (n, 1 + N)


@dataclass
class SampledTrials:
    """The sampled protocol's candidates, drawn once per task and shared by every model so they meet the same test."""

    rows: np.ndarray  # (t,) evaluated-user row of each trial (one trial per (user, target) pair)
    items: np.ndarray  # (t, 1 + n_negatives) int64: the target in column 0, then its negatives (0 = none left)
    sampler: str


def sample_trials(task: RetrievalTask, n_negatives: int = 100, sampler: str = "popularity",
                  seed: int = 0) -> SampledTrials:
    """Draws `n_negatives` distinct negatives per (user, target) pair, never an item the user has seen or targets.

    Draws with replacement and keeps each row's first distinct allowed items, which is the same distribution as
    sampling without replacement from the renormalised weights, but vectorised over all trials; rows that run out
    (users who have seen most of the weight) are redrawn, then finished one by one.

    Args:
        sampler: "popularity" (weight = training popularity + 1, so unseen items stay possible) or "uniform".
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    rng = np.random.default_rng(seed)
    n_items = task.space.n_items
    rows = np.repeat(np.arange(len(task.targets)), [len(t) for t in task.targets])
    target = np.concatenate(task.targets).astype(np.int64) if len(rows) else np.zeros(0, dtype=np.int64)
    weight = task.popularity[1:] + 1.0 if sampler == "popularity" else np.ones(n_items)
    cdf = np.cumsum(weight) / weight.sum()
    width = n_items + 1
    seen_rows = np.repeat(np.arange(len(task.seen)), [len(x) for x in task.seen])
    seen_items = np.concatenate(task.seen).astype(np.int64) if len(task.seen) else np.zeros(0, dtype=np.int64)
    banned = np.unique(np.r_[seen_rows * width + seen_items, rows * width + target])  # (user, item) codes to avoid
    negatives = np.zeros((len(rows), n_negatives), dtype=np.int64)
    todo = np.arange(len(rows))
    for _ in range(3):
        if not len(todo):
            break
        draw = 1 + np.minimum(np.searchsorted(cdf, rng.random((len(todo), 3 * n_negatives)), side="right"),
                              n_items - 1)  # (r, D) item indices
        ok = ~np.isin(rows[todo, None] * width + draw, banned)
        order = np.argsort(draw, axis=1, kind="stable")
        ranked_draw = np.take_along_axis(draw, order, axis=1)
        repeat = np.zeros_like(ok)
        np.put_along_axis(repeat, order, np.c_[np.zeros(len(todo), bool), ranked_draw[:, 1:] == ranked_draw[:, :-1]],
                          axis=1)
        ok &= ~repeat  # a later copy of an item already drawn in this row
        enough = ok.sum(axis=1) >= n_negatives
        first = np.argsort(~ok, axis=1, kind="stable")[:, :n_negatives]  # the first allowed draws, in draw order
        negatives[todo[enough]] = np.take_along_axis(draw, first, axis=1)[enough]
        todo = todo[~enough]
    for t in todo:  # rare: finish exactly
        allowed = np.setdiff1d(np.arange(1, width), banned[(banned // width) == rows[t]] % width)
        k = min(n_negatives, len(allowed))
        p = weight[allowed - 1] / weight[allowed - 1].sum()
        negatives[t, :k] = rng.choice(allowed, size=k, replace=False, p=p)
    return SampledTrials(rows=rows, items=np.concatenate([target[:, None], negatives], axis=1), sampler=sampler)


def ranked_to_scores(ranked: np.ndarray, rows: np.ndarray, items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores from ranked lists: K - position for listed items; unlisted items tie below all, broken at random.

    Args:
        ranked: (n_users, K) item indices best first.
        rows: (t,) the user row of each trial.
        items: (t, c) the candidate items of each trial.
    Returns:
        (t, c) float64 scores.
    """
    K = ranked.shape[1]
    width = int(max(ranked.max(initial=0), items.max(initial=0))) + 2
    # Encode (trial, item) as one integer so one sorted search finds every candidate's position in its list.
    listed = np.arange(len(rows))[:, None] * width + (ranked[rows] + 1)  # (t, K)
    order = np.argsort(listed, axis=None)
    flat = listed.ravel()[order]
    query = np.arange(len(rows))[:, None] * width + (items + 1)  # (t, c)
    at = np.minimum(np.searchsorted(flat, query), max(flat.size - 1, 0))
    found = (flat[at] == query) if flat.size else np.zeros(items.shape, dtype=bool)
    position = (order[at] % K) if flat.size else np.zeros(items.shape, dtype=np.int64)
    return np.where(found, K - position, -rng.random(items.shape))


def sampled_ranking_metrics(task: RetrievalTask, ranked: np.ndarray | None = None, scores_fn: ScoresFn | None = None,
                            trials: SampledTrials | None = None, n_negatives: int = 100, sampler: str = "popularity",
                            seed: int = 0, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """HR@k and NDCG@k of each target ranked among `n_negatives` sampled negatives (ONLY for comparison with papers).

    One trial per (user, target) pair; negatives from `sample_trials` (popularity-weighted as in SASRec and
    BERT4Rec, or uniform as in NCF), or the given `trials` so that several models share them. Give either the
    model's ranked lists (items below its top K then tie, ordered at random) or a `scores_fn`.

    Returns:
        {"hr@k", "ndcg@k" for each k, "trials", "n_negatives", "sampler", "protocol"}.
    """
    if (ranked is None) == (scores_fn is None):
        raise ValueError("give exactly one of ranked or scores_fn")
    if ranked is not None and len(ranked) != len(task.user_ids):
        raise ValueError(f"ranked has {len(ranked)} rows, the task has {len(task.user_ids)} users")
    trials = trials or sample_trials(task, n_negatives, sampler, seed)
    rows, items = trials.rows, trials.items
    rng = np.random.default_rng(seed + 1)
    scores = ranked_to_scores(ranked, rows, items, rng) if ranked is not None else scores_fn(rows, items)
    valid = items > 0
    # Rank of the target (column 0) among valid candidates; ties count against it, which is the conservative side.
    rank = ((scores[:, 1:] >= scores[:, :1]) & valid[:, 1:]).sum(axis=1)  # (t,) 0 = best
    out: dict = {"trials": int(len(rows)), "n_negatives": int(items.shape[1] - 1), "sampler": trials.sampler,
                 "protocol": "sampled: target among sampled negatives, only for comparison with papers"}
    for k in ks:
        hit = rank < k
        out[f"hr@{k}"] = float(hit.mean()) if len(rows) else float("nan")
        out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0).mean()) if len(rows) else float("nan")
    return out
