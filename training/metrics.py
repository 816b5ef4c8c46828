"""Offline metrics for retrieval and ranking, in plain NumPy.

Ranking metrics work on dense item indices (``0`` is padding, ``1..n_items`` are items, see docs/architecture.md):
``top_k_excluding`` turns a score matrix into ranked indices, and ``recall_at_k`` / ``hit_rate_at_k`` /
``ndcg_at_k`` compare them with each user's held-out items. ``roc_auc`` and ``log_loss`` score the ranker's
per-impression probabilities; ``popularity_counts`` feeds the popularity baseline.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Rows per chunk in top_k_excluding: 256 rows x 50_000 items x 4 bytes is a ~50 MB working copy, small enough to stay
# cheap next to the (n, m) input while amortising the per-call overhead of argpartition.
_CHUNK_ROWS = 256


def top_k_excluding(scores: np.ndarray, k: int, exclude: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Column indices of the ``k`` best scores per row, skipping padding and excluded columns.

    Args:
        scores: (n, m) float scores; column 0 is padding and never returned.
        k: how many indices to return per row (>= 1).
        exclude: optional length-n sequence; ``exclude[i]`` is an int array of columns row ``i`` must not get
            (e.g. the items already in the user's training history); may be empty.

    Returns:
        (n, k) int64 column indices, best first. Rows with fewer than ``k`` eligible columns are padded with -1.
        Ties at equal score are ordered by lower column index, except at the k-th boundary where argpartition
        picks among equal scores arbitrarily.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D (n, m), got shape {scores.shape}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n, m = scores.shape
    if exclude is not None and len(exclude) != n:
        raise ValueError(f"exclude has {len(exclude)} rows, scores has {n}")
    out = np.full((n, k), -1, dtype=np.int64)
    kk = min(k, m)  # argpartition needs kk <= m; the -1 padding covers the rest
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        key = np.array(scores[start:stop], dtype=np.float64)  # (c, m) private copy we may overwrite
        # Genuine -inf/nan scores become the lowest finite value so they stay distinguishable from ineligible columns.
        key[~(key > -np.inf)] = np.finfo(np.float64).min
        eligible = np.ones(key.shape, dtype=bool)
        eligible[:, 0] = False
        if exclude is not None:
            rows, cols = _exclusion_pairs(exclude[start:stop], m)
            eligible[rows, cols] = False
        key[~eligible] = -np.inf
        part = np.argpartition(-key, kk - 1, axis=1)[:, :kk]  # (c, kk) unordered best
        part_key = np.take_along_axis(key, part, axis=1)
        order = np.lexsort((part, -part_key), axis=1)  # primary: score desc, secondary: lower column
        best = np.take_along_axis(part, order, axis=1)
        n_eligible = eligible.sum(axis=1)  # (c,)
        best[np.arange(kk)[None, :] >= n_eligible[:, None]] = -1
        out[start:stop, :kk] = best
    return out


def _exclusion_pairs(exclude: Sequence[np.ndarray], m: int) -> tuple[np.ndarray, np.ndarray]:
    """Flattens per-row exclusion lists into (row, column) index arrays, validating the range."""
    lens = np.array([len(e) for e in exclude], dtype=np.int64)
    rows = np.repeat(np.arange(len(exclude)), lens)
    cols = np.concatenate([np.asarray(e, dtype=np.int64).ravel() for e in exclude]) if len(exclude) else rows
    if cols.size and (cols.min() < 0 or cols.max() >= m):
        raise ValueError(f"exclude holds column indices outside [0, {m}): min {cols.min()}, max {cols.max()}")
    return rows, cols


def _hit_matrix(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Hits of the top k for rows with a non-empty target: ((u, k) bool, (u,) target sizes)."""
    ranked = np.asarray(ranked)
    if ranked.ndim != 2:
        raise ValueError(f"ranked must be 2-D (n, K), got shape {ranked.shape}")
    if len(targets) != ranked.shape[0]:
        raise ValueError(f"targets has {len(targets)} rows, ranked has {ranked.shape[0]}")
    if not 1 <= k <= ranked.shape[1]:
        raise ValueError(f"k must be in [1, {ranked.shape[1]}] (ranked columns), got {k}")
    sizes = np.array([len(t) for t in targets], dtype=np.int64)
    rows = np.flatnonzero(sizes > 0)
    top = ranked[rows, :k].astype(np.int64)  # (u, k)
    if rows.size == 0:
        return np.zeros((0, k), dtype=bool), sizes[rows]
    tgt = [np.asarray(targets[r], dtype=np.int64).ravel() for r in rows]
    flat = np.concatenate(tgt)
    if flat.min() < 0:
        raise ValueError(f"targets must be non-negative column indices, got {flat.min()}")
    # Encode (row, item) pairs as one integer so a single np.isin finds every hit; +1 keeps -1 padding at code 0,
    # which no target can take.
    width = int(max(top.max(), flat.max())) + 2
    tgt_codes = np.repeat(np.arange(rows.size), sizes[rows]) * width + (flat + 1)
    top_codes = np.arange(rows.size)[:, None] * width + (top + 1)
    return np.isin(top_codes, tgt_codes), sizes[rows]


def recall_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Mean over rows with targets of |top-k ∩ T| / |T|.

    Args:
        ranked: (n, K) int ranked column indices, K >= k; -1 is padding.
        targets: length-n sequence of unique int arrays of relevant columns; empty rows are skipped.
        k: cut-off.

    Returns:
        The mean recall, or nan when no row has a target.
    """
    hits, sizes = _hit_matrix(ranked, targets, k)
    if sizes.size == 0:
        return float("nan")
    return float(np.mean(hits.sum(axis=1) / sizes))


def hit_rate_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Share of rows with targets that have at least one target in the top k (nan when none has a target).

    Args:
        ranked: (n, K) int ranked column indices, K >= k.
        targets: length-n sequence of int arrays of relevant columns.
        k: cut-off.
    """
    hits, sizes = _hit_matrix(ranked, targets, k)
    if sizes.size == 0:
        return float("nan")
    return float(np.mean(hits.any(axis=1)))


def ndcg_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> float:
    """Mean binary-relevance NDCG@k over rows with targets (nan when none has a target).

    DCG = sum over hit ranks r (0-based) of 1 / log2(r + 2); the ideal DCG places min(|T|, k) hits at the top.

    Args:
        ranked: (n, K) int ranked column indices, K >= k.
        targets: length-n sequence of unique int arrays of relevant columns.
        k: cut-off.
    """
    hits, sizes = _hit_matrix(ranked, targets, k)
    if sizes.size == 0:
        return float("nan")
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    dcg = hits @ discount  # (u,)
    ideal = np.cumsum(discount)[np.minimum(sizes, k) - 1]  # (u,)
    return float(np.mean(dcg / ideal))


def evaluate_ranked(
    ranked: np.ndarray, targets: Sequence[np.ndarray], ks: Sequence[int] = (10, 50, 100)
) -> dict[str, float]:
    """Recall, NDCG and hit rate at each cut-off.

    Args:
        ranked: (n, K) int ranked column indices, K >= max(ks).
        targets: length-n sequence of int arrays of relevant columns.
        ks: cut-offs.

    Returns:
        ``{"recall@k": ..., "ndcg@k": ..., "hr@k": ... for each k, "users": rows with a non-empty target}``.
    """
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = recall_at_k(ranked, targets, k)
        out[f"ndcg@{k}"] = ndcg_at_k(ranked, targets, k)
        out[f"hr@{k}"] = hit_rate_at_k(ranked, targets, k)
    out["users"] = int(sum(1 for t in targets if len(t) > 0))
    return out


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic, tied scores sharing their average rank.

    Args:
        labels: (n,) binary labels (0/1 or bool).
        scores: (n,) float scores, higher meaning more likely positive.

    Returns:
        P(score of a random positive > score of a random negative) + 0.5 * P(tie); nan if only one class is present.
    """
    y = np.asarray(labels).ravel().astype(bool)
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {s.shape[0]}")
    if np.isnan(s).any():
        raise ValueError("scores contain nan")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based average rank of each tie group: its last rank minus half of the extra members.
    avg_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = avg_rank[inverse][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy; probabilities are clipped to [eps, 1 - eps] so a confident miss stays finite.

    Args:
        labels: (n,) binary labels.
        probs: (n,) predicted probabilities of the positive class.
        eps: clipping margin.
    """
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if y.shape != p.shape:
        raise ValueError(f"labels and probs differ in length: {y.shape[0]} vs {p.shape[0]}")
    if y.size == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def popularity_counts(item_idx: np.ndarray, n_items: int) -> np.ndarray:
    """Interaction counts per item index for the popularity baseline.

    Args:
        item_idx: (e,) int item indices of interactions; 0 (padding/unknown) is ignored.
        n_items: number of items; valid indices are 1..n_items.

    Returns:
        (n_items + 1,) float64 counts; index 0 stays 0.
    """
    idx = np.asarray(item_idx, dtype=np.int64).ravel()
    if idx.size and (idx.min() < 0 or idx.max() > n_items):
        raise ValueError(f"item_idx must lie in [0, {n_items}], got min {idx.min()}, max {idx.max()}")
    counts = np.bincount(idx, minlength=n_items + 1).astype(np.float64)
    counts[0] = 0.0
    return counts


# --- Retrieval-harness metrics: per-user arrays, novelty, brand diversity, catalog coverage -------------------------

HARNESS_KS: tuple[int, ...] = (10, 50, 100, 500)  # 500 is the candidate budget the ranker receives


def per_user_at_k(ranked: np.ndarray, targets: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Recall, NDCG and hit of every row at one cut-off, for breakdowns (history length, number of interests).

    Args:
        ranked: (n, K) int ranked column indices, K >= k; -1 or 0 is padding.
        targets: length-n sequence of unique int arrays of relevant columns.
        k: cut-off.

    Returns:
        ``{"recall", "ndcg", "hr"}``, each (n,) float64; nan on rows without a target. Their nan-means equal
        `recall_at_k`, `ndcg_at_k` and `hit_rate_at_k`.
    """
    hits, sizes = _hit_matrix(ranked, targets, k)
    rows = np.flatnonzero(np.array([len(t) for t in targets], dtype=np.int64) > 0)
    out = {name: np.full(len(targets), np.nan) for name in ("recall", "ndcg", "hr")}
    if rows.size == 0:
        return out
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    ideal = np.cumsum(discount)[np.minimum(sizes, k) - 1]  # (u,)
    out["recall"][rows] = hits.sum(axis=1) / sizes
    out["ndcg"][rows] = (hits @ discount) / ideal
    out["hr"][rows] = hits.any(axis=1)
    return out


def novelty_recall(ranked: np.ndarray, targets: Sequence[np.ndarray], item_created_ms: np.ndarray,
                   new_after_ms: int, k: int) -> tuple[float, int]:
    """Recall@k on the targets created after `new_after_ms` only: can a model find items with little history?

    Args:
        ranked: (n, K) ranked item indices, K >= k.
        targets: length-n sequence of target item indices.
        item_created_ms: (n_items + 1,) creation time of each item index in ms (row 0 is padding).
        new_after_ms: items created strictly after this instant count as new.
        k: cut-off.

    Returns:
        (mean recall over rows with at least one new target, nan when none; the number of such rows).
    """
    created = np.asarray(item_created_ms, dtype=np.int64)
    new_targets = [np.asarray(t, dtype=np.int64)[created[np.asarray(t, dtype=np.int64)] > new_after_ms]
                   for t in targets]
    users = sum(1 for t in new_targets if len(t))
    return (recall_at_k(ranked, new_targets, k) if users else float("nan")), users


def brand_diversity(ranked: np.ndarray, item_brand: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Longest run of consecutive same-brand items and number of distinct brands in each top-k list.

    Args:
        ranked: (n, K) ranked item indices, K >= k; entries <= 0 are padding and belong to no brand.
        item_brand: (n_items + 1,) brand index of each item index; brand 0 (unknown) counts as one brand, so a
            data set without brands shows runs of k (the truth about that data, not a model fault).
        k: cut-off.

    Returns:
        (longest_run, unique_brands): each (n,) int64; 0 for an empty list.
    """
    top = np.asarray(ranked)[:, :k].astype(np.int64)  # (n, k)
    valid = top > 0
    brand = np.where(valid, np.asarray(item_brand, dtype=np.int64)[np.maximum(top, 0)], -1)  # -1 marks padding
    run = valid[:, 0].astype(np.int64)
    longest = run.copy()
    for j in range(1, top.shape[1]):
        same = valid[:, j] & (brand[:, j] == brand[:, j - 1])
        run = np.where(same, run + 1, valid[:, j].astype(np.int64))
        longest = np.maximum(longest, run)
    ordered = np.sort(brand, axis=1)  # padding (-1) sorts first and is not counted
    starts = np.ones_like(ordered, dtype=bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    unique = (starts & (ordered >= 0)).sum(axis=1).astype(np.int64)
    return longest, unique


def catalog_coverage(ranked: np.ndarray, n_items: int, k: int) -> float:
    """Share of the catalog (item indices 1..n_items) that appears in at least one top-k list."""
    if n_items < 1:
        raise ValueError(f"n_items must be >= 1, got {n_items}")
    top = np.asarray(ranked)[:, :k].ravel()
    shown = np.unique(top[(top > 0) & (top <= n_items)])
    return float(len(shown) / n_items)


def overlap_at_k(a: Sequence[str], b: Sequence[str], k: int) -> float:
    """Share of the first k items of `a` that are among the first k of `b` (1.0 for two empty lists)."""
    top_a, top_b = list(a[:k]), set(b[:k])
    if not top_a and not top_b:
        return 1.0
    return len([x for x in top_a if x in top_b]) / max(len(top_a), len(top_b))


def rank_correlation(a: Sequence[str], b: Sequence[str], k: int) -> float | None:
    """Kendall's tau-a between the orders two top-k lists give the items they share; None when they share fewer
    than two (no order to compare)."""
    pos_b = {x: i for i, x in enumerate(b[:k])}
    shared = [pos_b[x] for x in a[:k] if x in pos_b]  # b's positions, in a's order
    n = len(shared)
    if n < 2:
        return None
    r = np.asarray(shared)
    upper = np.triu_indices(n, 1)
    signs = np.sign(r[None, :] - r[:, None])[upper]  # pair (i<j) in a's order: +1 when b keeps their order
    return float(signs.sum() / len(signs))
