"""The sampled protocol: each target ranked among 100 sampled negatives. **Only for comparison with papers**: sampled
metrics can rank models differently from full ranking (Krichene & Rendle, KDD 2020); the full-catalog ranking of
`training.data.splits` is the protocol this project decides by.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from training.data.splits import RetrievalTask

SAMPLERS = ("popularity", "uniform")


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
