"""Business rules applied to one ranked list after ranking: bought down-sort and brand diversity.

The rules are plain functions of (ranked list, user state, config, rng) so that the offline evaluation in
``training/`` and the serving path in ``deployments/`` apply exactly the same code (docs/architecture.md).
Every rule only reorders: the policy keeps every item it is given.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

REASON_BOUGHT = "policy:bought_down_sort"
REASON_BRAND = "policy:brand_diversity"
_SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class PolicyConfig:
    """Switches and knobs of the policy stage; validated on construction, so every path (YAML, Serve
    ``user_config``, overrides) gets the same errors."""

    # On by default: a page of one brand reads as an ad, and users skim past it.
    brand_diversity: bool = True
    # 1 = no two consecutive items of one brand, the strictest rule and the usual merchandising default.
    max_brand_run: int = 1
    # On by default: re-showing what the user just bought wastes the top slots.
    bought_down_sort: bool = True
    # Two months covers the repeat-purchase gap of most durable goods; consumables want a shorter window.
    bought_window_days: float = 60.0

    def __post_init__(self) -> None:
        for name in ("brand_diversity", "bought_down_sort"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise ValueError(f"PolicyConfig.{name} must be a bool, got {value!r}")
            object.__setattr__(self, name, bool(value))
        run = self.max_brand_run
        if isinstance(run, (bool, np.bool_)) or not isinstance(run, (int, np.integer)) or run < 1:
            raise ValueError(f"PolicyConfig.max_brand_run must be an int >= 1, got {run!r}")
        object.__setattr__(self, "max_brand_run", int(run))
        window = self.bought_window_days
        if (
            isinstance(window, (bool, np.bool_))
            or not isinstance(window, (int, float, np.integer, np.floating))
            or not math.isfinite(window)
            or window < 0
        ):
            raise ValueError(f"PolicyConfig.bought_window_days must be a finite number >= 0, got {window!r}")
        object.__setattr__(self, "bought_window_days", float(window))

    def with_overrides(self, overrides: Mapping[str, object] | None) -> PolicyConfig:
        """A copy with ``overrides`` applied; an unknown key or an invalid value raises ValueError naming it."""
        if not overrides:
            return self
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PolicyConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> PolicyConfig:
        """Builds a config from a mapping (e.g. YAML); None gives the defaults."""
        return cls().with_overrides(data)

    def to_dict(self) -> dict:
        """Plain dict of every field, the inverse of ``from_dict``."""
        return dataclasses.asdict(self)


@dataclass
class RankedList:
    """One request's ranked items, best first; the fields are parallel sequences of length n."""

    item_ids: list[str]
    scores: np.ndarray  # (n,) float32
    brands: list[str]
    categories: list[str]
    reasons: list[str]  # why each item is here, e.g. "retrieval", "interest:1", "cold_start:popular"

    def __post_init__(self) -> None:
        self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        n = len(self.item_ids)
        lengths = {
            "scores": len(self.scores),
            "brands": len(self.brands),
            "categories": len(self.categories),
            "reasons": len(self.reasons),
        }
        wrong = {name: size for name, size in lengths.items() if size != n}
        if wrong:
            raise ValueError(f"RankedList fields must all have len(item_ids) = {n}; got {wrong}")

    def __len__(self) -> int:
        return len(self.item_ids)

    def take(self, order: Sequence[int]) -> RankedList:
        """A new list holding the items at positions ``order`` (a reorder or a selection)."""
        idx = np.asarray(order, dtype=np.int64).reshape(-1)
        return RankedList(
            item_ids=[self.item_ids[i] for i in idx],
            scores=self.scores[idx],
            brands=[self.brands[i] for i in idx],
            categories=[self.categories[i] for i in idx],
            reasons=[self.reasons[i] for i in idx],
        )


@dataclass
class UserState:
    """What the policy knows about the requesting user."""

    bought_at: dict[str, float]  # item_id -> unix seconds of the user's latest purchase of it
    now: float  # unix seconds of the request


def longest_brand_run(brands: Sequence[str]) -> int:
    """Length of the longest block of consecutive equal brands (0 for an empty list)."""
    best = run = 0
    prev: object = object()  # a sentinel equal to no brand
    for brand in brands:
        run = run + 1 if brand == prev else 1
        best = max(best, run)
        prev = brand
    return best


def _recently_bought(ranked: RankedList, user: UserState, window_days: float) -> np.ndarray:
    """(n,) bool: the item was bought at most ``window_days`` before ``user.now``."""
    horizon = user.now - window_days * _SECONDS_PER_DAY
    # A purchase stamped after `now` (clock skew between services) still counts as recent.
    return np.array([user.bought_at.get(i, -math.inf) >= horizon for i in ranked.item_ids], dtype=bool)


def _take_marking(ranked: RankedList, order: Sequence[int], reason: str) -> RankedList:
    """Reorders by ``order`` and sets ``reason`` on items that ended below their former slot."""
    out = ranked.take(order)
    for new_pos, old_pos in enumerate(order):
        if new_pos > old_pos:
            out.reasons[new_pos] = reason
    return out


def down_sort_bought(ranked: RankedList, user: UserState, config: PolicyConfig) -> RankedList:
    """Moves items bought within ``config.bought_window_days`` before ``user.now`` below all other items.

    Both groups keep their relative order (a stable partition). Bought items that actually moved get the reason
    ``"policy:bought_down_sort"``; purchases older than the window do not count.
    """
    recent = _recently_bought(ranked, user, config.bought_window_days)
    order = np.concatenate([np.flatnonzero(~recent), np.flatnonzero(recent)])
    return _take_marking(ranked, order.tolist(), REASON_BOUGHT)


def _feasible(counts: np.ndarray, n_left: int, tail: int, tail_run: int, max_run: int) -> bool:
    """Whether the remaining items (``counts`` per brand code) can follow a tail of ``tail_run`` items of brand
    ``tail`` (-1 for none) with no run longer than ``max_run``.

    A brand with c items needs ceil(c / r) blocks, hence ceil(c / r) - 1 separators from the other brands:
    c <= r * (others + 1). The tail's items count towards its own brand's first block. The condition is checked
    for the tail brand and for the largest other brand (the hardest one); it is also sufficient, which
    tests/unit/test_policy.py checks against brute force.
    """
    if tail >= 0 and counts[tail] + tail_run > max_run * (n_left - counts[tail] + 1):
        return False
    if tail >= 0:
        saved = counts[tail]
        counts[tail] = -1  # exclude the tail brand from the max without copying
        c_max = int(counts.max()) if counts.size else 0
        counts[tail] = saved
    else:
        c_max = int(counts.max()) if counts.size else 0
    return c_max <= max_run * (n_left - c_max + 1)


def _diversified_order(
    brands: Sequence[str], max_run: int, tail_brand: str | None = None, tail_run: int = 0
) -> list[int]:
    """Greedy least-displacement order with no brand run longer than ``max_run`` whenever that is achievable.

    At each slot take the best remaining item whose brand neither breaks the run limit now nor leaves a rest that
    cannot be arranged (see ``_feasible``), so the rule holds on the whole list whenever any arrangement satisfies
    it. When the list cannot satisfy the rule, take the best item allowed now, else the best remaining (in order).
    ``tail_brand``/``tail_run`` describe items already placed above this segment. O(n * distinct brands).
    """
    n = len(brands)
    vocab = {b: j for j, b in enumerate(dict.fromkeys(brands))}
    codes = np.array([vocab[b] for b in brands], dtype=np.int64)
    counts = np.bincount(codes, minlength=len(vocab)).astype(np.int64)  # remaining items per brand code
    queues = [np.flatnonzero(codes == j).tolist() for j in range(len(vocab))]  # positions per brand, best first
    heads = np.array([q[0] for q in queues], dtype=np.int64)  # best remaining position per brand, n if none
    ptr = [0] * len(vocab)
    last = vocab.get(tail_brand, -1) if tail_brand is not None else -1
    run = tail_run if last >= 0 else 0
    r = max_run
    # Feasibility is kept by feasible moves and never regained once lost, so one check decides whether to look ahead.
    look_ahead = n > 0 and _feasible(counts, n, last, run, r)
    order: list[int] = []
    for slot in range(n):
        n_left = n - slot - 1
        best = int(np.argmin(heads))
        other = best
        if best == last:  # best remaining item of another brand, if any
            heads[last] = n + 1
            other = int(np.argmin(heads))
            heads[last] = queues[last][ptr[last]]
            other = other if heads[other] < n else best
        choice = best if best != last or run < r else other
        if look_ahead:
            # After this slot a brand with c items left needs c <= r * (n_left - c + 1) (see _feasible). A brand
            # already past that bound ("critical") must be placed now; with none, any other brand is safe and the
            # last brand only if its own bound still holds with the longer run.
            critical = np.flatnonzero(counts * (r + 1) > r * (n_left + 1))
            if critical.size:
                choice = int(critical[0])
            elif best == last and (run + 1 > r or counts[last] + run > r * (n_left - counts[last] + 2)):
                choice = other
        order.append(queues[choice][ptr[choice]])
        ptr[choice] += 1
        counts[choice] -= 1
        heads[choice] = queues[choice][ptr[choice]] if ptr[choice] < len(queues[choice]) else n
        run = run + 1 if choice == last else 1
        last = choice
    return order


def diversify_brands(ranked: RankedList, config: PolicyConfig) -> RankedList:
    """Reorders so no brand appears more than ``config.max_brand_run`` times in a row, moving items as little
    as possible (greedy: the best remaining item that keeps the rest arrangeable, see ``_diversified_order``).

    When the brand mix makes the rule impossible (e.g. for max_run 1, a brand with more than ceil(n / 2) items),
    the rule holds as long as it can and the leftover items follow in order. Items that the rule placed below
    their former slot get the reason ``"policy:brand_diversity"``; other reasons are kept.
    """
    order = _diversified_order(ranked.brands, config.max_brand_run)
    return _take_marking(ranked, order, REASON_BRAND)


def apply_policy(
    ranked: RankedList, user: UserState, config: PolicyConfig, rng: np.random.Generator | None = None
) -> RankedList:
    """Applies the enabled rules: bought down-sort first, then brand diversity.

    The down-sort is the harder rule: brand diversity reorders within the not-bought and the bought groups
    (continuing the brand run across the boundary) and never lifts a recently bought item above another.

    Args:
        ranked: the ranked list, best first.
        user: the user's purchases and the request time.
        config: which rules run and their knobs.
        rng: accepted for future randomised rules (exploration); unused today.

    Returns:
        A permutation of ``ranked`` with updated reasons.
    """
    del rng  # no randomised rule yet; the argument keeps the signature stable for exploration
    out = ranked
    n_fresh = len(ranked)
    if config.bought_down_sort:
        n_fresh = int((~_recently_bought(ranked, user, config.bought_window_days)).sum())
        out = down_sort_bought(out, user, config)
    if config.brand_diversity:
        r = config.max_brand_run
        head = _diversified_order(out.brands[:n_fresh], r)
        tail_brand = out.brands[head[-1]] if head else None
        tail_run = 0
        for pos in reversed(head):  # length of the run the head segment ends with
            if out.brands[pos] != tail_brand:
                break
            tail_run += 1
        rest = _diversified_order(out.brands[n_fresh:], r, tail_brand, tail_run)
        out = _take_marking(out, head + [n_fresh + p for p in rest], REASON_BRAND)
    return out
