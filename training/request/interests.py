"""Multi-interest queries, explicit conditions and the quota merge: the request-time half of multi-interest
retrieval, shared by the offline adapter (`training.fit.retrieval.MultiInterestRetrieval`) and serving
(`training.request.retrieval`).

Conditions at request time: the page's category, a category named in the search query, and the categories the user
"follows" (there is no follow data: the ones they engaged with most in their recent history, see `ConditionConfig`).
Every interest and condition is one ANN query; `merge_interests` shares the top k between them by quota (explicit
conditions equally, interests by importance), de-duplicates, merges round-robin and records why each item is there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from training.data.features import QUERY_BUCKETS, QUERY_TOKENS, query_tokens

if TYPE_CHECKING:
    from training.models.multi_interest import MultiInterestModel


def category_query_buckets(categories: Sequence[str]) -> np.ndarray:
    """(QUERY_BUCKETS + 1,) category index of each query-token bucket whose token is a category name, else 0.

    Queries reach the model as hashed tokens; a token that hashes like exactly one single-word category name is read
    as that category (a bucket two names share is ambiguous and left out).
    """
    names = list(categories)
    buckets = query_tokens(names)[:, 0]  # (n_categories,) bucket of each name's first token
    single = np.array([len(n.split()) == 1 for n in names], dtype=bool)
    counts = np.bincount(buckets[single], minlength=QUERY_BUCKETS + 1)
    out = np.zeros(QUERY_BUCKETS + 1, dtype=np.int64)
    for idx in np.nonzero(single)[0]:
        if counts[buckets[idx]] == 1:
            out[buckets[idx]] = idx + 1  # category index = vocabulary row + 1
    return out


@dataclass(frozen=True)
class ConditionConfig:
    """Where explicit conditions come from and how their results are filtered."""

    from_context: bool = True  # the request's category (a category page)
    from_query: bool = True  # a category named in the search query
    # There is no follow data: a user "follows" the categories they engaged with most in their recent history.
    max_followed: int = 1  # one followed category: the implicit interests already cover the rest of the history
    min_follow_actions: int = 4  # engagements in a category, within the history window, that make it followed
    max_conditions: int = 3  # bounds the ANN queries per request at K + 3
    min_score: float = 0.9  # relevance filter: an item outside the category stays only when it scores this high

    def __post_init__(self) -> None:
        for name in ("max_followed", "min_follow_actions", "max_conditions"):
            if getattr(self, name) < 0:
                raise ValueError(f"ConditionConfig.{name} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ConditionConfig":
        """From a mapping (a bundle's config, an adapter's argument); unknown keys are errors naming them."""
        unknown = sorted(set(d or {}) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"conditions: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**(d or {}))


def explicit_conditions(hist_items: np.ndarray, context: np.ndarray, item_category: np.ndarray,
                        query_category: np.ndarray, cfg: ConditionConfig) -> list[list[tuple[int, str]]]:
    """Explicit conditions per user, in priority order: context category, query category, followed categories.

    Args:
        hist_items: (n, L) item indices; context: (n, C) context indices (`CONTEXT_COLUMNS`).
        item_category: (n_items,) category index per item index; query_category: see `category_query_buckets`.
    Returns:
        per user, a list of (category index, source) with source in {"context", "query", "followed"}, no repeats.
    """
    out = []
    for r in range(len(hist_items)):
        found: list[tuple[int, str]] = []
        if cfg.from_context:
            found.append((int(context[r, 3]), "context"))
        if cfg.from_query:
            found += [(int(query_category[t]), "query") for t in context[r, 4:4 + QUERY_TOKENS]]
        cats = item_category[hist_items[r][hist_items[r] > 0]]
        counts = np.bincount(cats, minlength=1)
        counts[0] = 0
        top = np.argsort(-counts, kind="stable")[:cfg.max_followed]
        found += [(int(c), "followed") for c in top if counts[c] >= cfg.min_follow_actions]
        kept: list[tuple[int, str]] = []
        for cat, source in found:
            if cat > 0 and cat not in {c for c, _ in kept}:
                kept.append((cat, source))
        out.append(kept[:cfg.max_conditions])
    return out


def relevant(items: np.ndarray, scores: np.ndarray, condition: int, item_category: np.ndarray,
             min_score: float) -> tuple[np.ndarray, np.ndarray]:
    """Relevance filter of a conditioned query's (n,) results: items of the category, or scoring at least min_score."""
    valid = items > 0
    keep = valid & ((item_category[np.where(valid, items, 0)] == condition) | (scores >= min_score))
    return items[keep], scores[keep]


def interest_quotas(importance: np.ndarray, explicit: Sequence[bool], k: int) -> np.ndarray:
    """(n,) slots of each result list summing to k: an explicit condition gets an equal share (1/n of k), the
    implicit interests split the rest by importance; largest remainders round."""
    importance = np.asarray(importance, dtype=np.float64)
    explicit = np.asarray(explicit, dtype=bool)
    n = len(importance)
    share = np.where(explicit, 1.0 / n, 0.0)
    implicit = ~explicit
    if implicit.any():
        imp = np.clip(importance[implicit], 0.0, None)
        imp = imp / imp.sum() if imp.sum() > 0 else np.full(implicit.sum(), 1.0 / implicit.sum())
        share[implicit] = imp * implicit.sum() / n
    raw = share * k
    quota = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - quota), kind="stable")
    quota[order[:k - quota.sum()]] += 1
    return quota


def merge_interests(results: Sequence[tuple[np.ndarray, np.ndarray]], importance: np.ndarray, k: int,
                    explicit: Sequence[bool], reasons: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Merges the result lists of one user's queries into k items, each with the reason of the list that placed it.

    Lists take turns in the given order, each taking its next item not yet taken until its quota
    (`interest_quotas`) is full; slots a short list leaves free go, in further turns, to lists with items left.

    Args:
        results: per query, (item ids (n_i,), scores (n_i,)) best first; ids <= 0 are padding and skipped.
        importance: (n,) importance of each query (ignored for explicit ones); explicit: (n,) flags.
        reasons: (n,) reason of each list, e.g. "interest:0" or "condition:category=c3".
    Returns:
        items (m,) int64, scores (m,) float32 and m reasons, m <= k, no item twice.
    """
    n = len(results)
    if not (len(importance) == len(explicit) == len(reasons) == n):
        raise ValueError(f"results, importance, explicit and reasons must have one entry per query; got {n}, "
                         f"{len(importance)}, {len(explicit)}, {len(reasons)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), []
    quota = interest_quotas(importance, explicit, k)
    pointer, taken = [0] * n, [0] * n
    chosen: dict[int, tuple[float, str]] = {}  # insertion-ordered: the merge order
    for capped in (True, False):  # first within quotas, then filling what short lists left
        active = True
        while active and len(chosen) < k:
            active = False
            for i, (ids, scores) in enumerate(results):
                if (capped and taken[i] >= quota[i]) or len(chosen) >= k:
                    continue
                while pointer[i] < len(ids) and (ids[pointer[i]] <= 0 or int(ids[pointer[i]]) in chosen):
                    pointer[i] += 1  # de-duplicate: an item keeps the reason of the list that took it first
                if pointer[i] < len(ids):
                    chosen[int(ids[pointer[i]])] = (float(scores[pointer[i]]), reasons[i])
                    pointer[i] += 1
                    taken[i] += 1
                    active = True
    items = np.fromiter(chosen, dtype=np.int64, count=len(chosen))
    return items, np.array([s for s, _ in chosen.values()], np.float32), [r for _, r in chosen.values()]


@dataclass
class InterestQueries:
    """The ANN queries of a batch of users: each used implicit interest (by importance), then each condition."""

    xq: np.ndarray  # (nq, D) float32 query vectors
    owner: np.ndarray  # (nq,) int64 row of the query's user in the batch
    importance: np.ndarray  # (nq,) float64 interest importance (0 for conditions: they get equal quotas)
    condition: np.ndarray  # (nq,) int64 category index of a condition, 0 for an implicit interest
    reasons: list[str]  # (nq,) "interest:<capsule>" or "condition:category=<name>"


@torch.inference_mode()
def interest_queries(model: MultiInterestModel, hist_items: np.ndarray, hist_actions: np.ndarray,
                     hist_ages: np.ndarray, context: np.ndarray, conditions: Sequence[Sequence[tuple[int, str]]],
                     category_names: Sequence[str]) -> InterestQueries:
    """Implicit interests and conditioned vectors of n users ((n, L) x3, (n, C); conditions from
    `explicit_conditions`; category_names[i - 1] names category index i)."""
    arrays = [torch.tensor(a, dtype=torch.long) for a in (hist_items, hist_actions, hist_ages, context)]
    V, imp, mask = model.user_interests(*arrays)  # (n, K, D), (n, K), (n, K)
    owner_c = np.array([r for r, conds in enumerate(conditions) for _ in conds], dtype=np.int64)
    cats = np.array([c for conds in conditions for c, _ in conds], dtype=np.int64)
    C = (model.condition_tower(*(a[owner_c] for a in arrays), torch.from_numpy(cats)).numpy() if len(cats)
         else np.zeros((0, V.shape[-1]), np.float32))
    imp_np, mask_np, V_np = imp.numpy(), mask.numpy(), V.numpy()
    start = np.searchsorted(owner_c, np.arange(len(hist_items) + 1))
    entries: list[tuple] = []  # (vector, owner, importance, condition, reason) per query
    for r in range(len(hist_items)):
        used = np.argsort(-np.where(mask_np[r], imp_np[r], -1.0), kind="stable")[:int(mask_np[r].sum())]
        entries += [(V_np[r, k], r, imp_np[r, k], 0, f"interest:{k}") for k in used]
        entries += [(C[j], r, 0.0, cats[j], f"condition:category={category_names[cats[j] - 1]}")
                    for j in range(start[r], start[r + 1])]
    xq, owner, importance, condition, reasons = zip(*entries) if entries else ((),) * 5
    return InterestQueries(np.asarray(xq, np.float32).reshape(-1, V.shape[-1]), np.asarray(owner, np.int64),
                           np.asarray(importance, np.float64), np.asarray(condition, np.int64), list(reasons))


def merge_queries(D: np.ndarray, I: np.ndarray, q: InterestQueries, n_users: int, k: int, item_category: np.ndarray,
                  min_score: float) -> list[tuple[np.ndarray, np.ndarray, list[str]]]:
    """Per user, the quota merge (`merge_interests`) of their queries' (nq, k') results D (scores) and I (ids, -1 =
    none); conditioned results pass the relevance filter first."""
    out = []
    for r in range(n_users):
        rows = np.nonzero(q.owner == r)[0]
        results = [(I[j], D[j]) if q.condition[j] == 0 else relevant(I[j], D[j], q.condition[j], item_category,
                                                                      min_score) for j in rows]
        out.append(merge_interests(results, q.importance[rows], k, [bool(q.condition[j]) for j in rows],
                                   [q.reasons[j] for j in rows]))
    return out


def user_queries(model: MultiInterestModel, arrays: Sequence[np.ndarray], item_category: np.ndarray,
                 category_names: Sequence[str], query_category: np.ndarray,
                 conditions: ConditionConfig) -> InterestQueries:
    """The queries of n users: their explicit conditions (`explicit_conditions`), then `interest_queries`.

    Args:
        arrays: the `USER_INPUTS` arrays of the n users ((n, L) x3, (n, C)).
        item_category: (n_items + 1,) category index per item index, for the conditions.
        category_names, query_category: the bundle's category vocabulary and `category_query_buckets` of it.
    """
    conds = explicit_conditions(arrays[0], arrays[3], item_category, query_category, conditions)
    return interest_queries(model, *arrays, conds, category_names)
