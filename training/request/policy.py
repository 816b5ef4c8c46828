"""Business rules applied to one ranked list after ranking (their config: `training.request.policy_config`).

The rules are plain functions of (ranked list, user state, config, rng) so that the offline evaluation and the
replay in ``training/`` and the serving path in ``deployments/`` apply exactly the same code (docs/architecture.md).
``apply_policy`` runs the enabled rules in this order, each on the result of the one before:

1. ``filter_items``: drops blocked brands/categories and out-of-stock items (the only rule that removes items).
2. ``down_sort_bought``: recently bought items sink below all others; every later rule keeps that partition.
3. ``place_sponsored``: sponsored items that rank below a sponsored slot are pinned to it (cap, minimum spacing).
4. ``explore_new_items``: with probability epsilon per exploration slot, a random new item is pinned to it.
5. ``apply_quotas``: at least/at most N new items and at most N per category in the top ``quota_k`` (pins count).
6. ``diversify_brands``: no brand run longer than ``max_brand_run``, least displacement, pinned slots held fixed.
7. ``shuffle``: with probability ``shuffle_epsilon`` the first ``shuffle_top`` items in a uniformly random order
   (logging exploration: the support off-policy estimates from served logs need, ``shuffle_marginal``).

Reasons: every output item carries one reason string. An item no rule acted on keeps the reason it arrived with
(``"retrieval"``, ``"interest:1"``, ``"cold_start:new"``...). An item a rule acted on gets ``"policy:<rule>"`` with
<rule> one of ``bought_down_sort``, ``sponsored``, ``explore``, ``novelty_quota``, ``category_quota``,
``brand_diversity``, ``shuffle``; a rule acts on the items it places or promotes (sponsored, explore, novelty_quota) and on those
it pushes down (the others). When several rules act on one item, the last one names it.

Speed: one request builds a small working plan (an order of indices, pinned slots, reasons) that every rule edits,
and the output list is materialised once; the brand greedy is a pure-Python pass with O(1) work per slot in the
common case (see ``_diversify_segment``), because per-slot NumPy calls cost microseconds each.
"""

from __future__ import annotations

import hashlib
from collections import Counter, deque
from collections.abc import Sequence

import numpy as np

from training.request.contracts import RankedList, UserState
from training.request.policy_config import PolicyConfig

REASON_BOUGHT = "policy:bought_down_sort"
REASON_BRAND = "policy:brand_diversity"
REASON_EXPLORE = "policy:explore"
REASON_SPONSORED = "policy:sponsored"
REASON_NOVELTY = "policy:novelty_quota"
REASON_CATEGORY = "policy:category_quota"
REASON_SHUFFLE = "policy:shuffle"
SECONDS_PER_DAY = 86_400.0


def request_rng(request_id: str) -> np.random.Generator:
    """The generator of one request: the same request id always draws the same exploration."""
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "big"))


def policy_rng(config: PolicyConfig, request_id: str) -> np.random.Generator | None:
    """The generator `apply_policy` gets for a request: its `request_rng` when a rule is random, else None. Serving
    and the replay of served logs both call this, so a logged request re-runs with the draws it was served with."""
    return request_rng(request_id) if config.randomised else None


def longest_brand_run(brands: Sequence[str]) -> int:
    """Length of the longest block of consecutive equal brands (0 for an empty list)."""
    best = run = 0
    prev: object = object()  # a sentinel equal to no brand
    for brand in brands:
        run = run + 1 if brand == prev else 1
        best = max(best, run)
        prev = brand
    return best


def is_new_item(created_at: np.ndarray | None, now: float, new_item_days: float) -> np.ndarray | None:
    """(n,) bool: created at most ``new_item_days`` before ``now`` (a future stamp counts as new); None if unknown."""
    if created_at is None:
        return None
    return created_at >= now - new_item_days * SECONDS_PER_DAY


class _Plan:
    """Working state of one request: the current order of the original indices, slots pinned by sponsored and
    exploration rules, and the reasons; rules edit it, ``result`` materialises it once."""

    def __init__(self, ranked: RankedList, user: UserState, config: PolicyConfig) -> None:
        self.ranked, self.user, self.config = ranked, user, config
        self.order = list(range(len(ranked)))
        self.pins: dict[int, int] = {}  # final slot -> original index
        self.reasons = list(ranked.reasons)
        self.n_fresh = len(ranked)  # order[:n_fresh] are not recently bought (once the down-sort ran)
        self.n_quota = 0  # order[:n_quota] fill the top quota_k's free slots (once the quotas ran)
        self._bought: list[bool] | None = None
        self._new: list[bool] | None = None
        self.explore_pools: dict[int, int] = {}  # exploration slot -> new items it could have drawn from

    def bought(self) -> list[bool]:
        """Per original index: bought within the window. A purchase stamped after `now` (clock skew between
        services) still counts as recent."""
        if self._bought is None:
            horizon = self.user.now - self.config.bought_window_days * SECONDS_PER_DAY
            recent = {i for i, t in self.user.bought_at.items() if t >= horizon}
            self._bought = [i in recent for i in self.ranked.item_ids] if recent else [False] * len(self.ranked)
        return self._bought

    def new(self) -> list[bool]:
        if self._new is None:
            mask = is_new_item(self.ranked.created_at, self.user.now, self.config.new_item_days)
            self._new = [False] * len(self.ranked) if mask is None else mask.tolist()
        return self._new

    def free_slots_before(self, slot: int) -> int:
        """How many order items come before final slot ``slot`` (slots not pinned)."""
        return slot - sum(1 for s in self.pins if s < slot)

    def pin(self, slot: int, index: int, reason: str) -> None:
        self.order.remove(index)
        self.n_fresh -= 1
        self.pins[slot] = index
        self.reasons[index] = reason

    def can_pin(self, slot: int) -> bool:
        """A free slot reachable without lifting a pinned item above a recently bought one."""
        return slot not in self.pins and slot < len(self.order) + len(self.pins) and \
            self.free_slots_before(slot) <= self.n_fresh - 1

    def final_order(self) -> list[int]:
        out = list(self.order)
        for slot in sorted(self.pins):
            out.insert(slot, self.pins[slot])
        return out

    def result(self) -> RankedList:
        out = self.ranked.take(self.final_order(), self.reasons)
        out.propensity = self.propensities(out.reasons)
        return out

    def propensities(self, reasons: Sequence[str]) -> np.ndarray:
        """(n,) probability of each final position's item being there. Exploration is the only random rule: the
        item it pinned at slot s had epsilon / |pool of s|; any other item at position p is there when none of
        the exploration slots at or above p (with a pool) fired, (1 - epsilon) ** k. (An explored list reached
        another way, e.g. the pool's draw equal to the item that was there anyway, is left out: a lower bound.)"""
        eps = self.config.explore_epsilon
        out = np.ones(len(reasons), dtype=np.float64)
        if eps <= 0.0 or not self.explore_pools:
            return out
        slots = sorted(self.explore_pools)
        for p, reason in enumerate(reasons):
            if reason == REASON_EXPLORE and p in self.explore_pools:
                out[p] = eps / self.explore_pools[p]
            else:
                out[p] = (1.0 - eps) ** sum(1 for s in slots if s <= p)
        return out


def _filter(plan: _Plan) -> None:
    cfg, ranked = plan.config, plan.ranked
    brands, cats = frozenset(cfg.blocked_brands), frozenset(cfg.blocked_categories)
    stock = ranked.in_stock if cfg.filter_out_of_stock and ranked.in_stock is not None else None
    if not brands and not cats and (stock is None or stock.all()):
        return
    keep = np.ones(len(ranked), bool) if stock is None else stock.copy()
    if brands:
        keep &= np.array([b not in brands for b in ranked.brands], dtype=bool)
    if cats:
        keep &= np.array([c not in cats for c in ranked.categories], dtype=bool)
    plan.order = [i for i in plan.order if keep[i]]
    plan.n_fresh = len(plan.order)


def _down_sort(plan: _Plan) -> None:
    bought = plan.bought()
    fresh = [i for i in plan.order if not bought[i]]
    if len(fresh) == len(plan.order):
        return
    sunk = [i for i in plan.order if bought[i]]
    old = {i: j for j, i in enumerate(plan.order)}
    for j, i in enumerate(sunk, start=len(fresh)):
        if j > old[i]:
            plan.reasons[i] = REASON_BOUGHT
    plan.order, plan.n_fresh = fresh + sunk, len(fresh)


def _eligible(plan: _Plan, slot: int, wanted: Sequence[bool]) -> list[int]:
    """Original indices of fresh items flagged in ``wanted`` that currently sit at or below ``slot``, best first."""
    lo = plan.free_slots_before(slot)
    return [i for i in plan.order[lo:plan.n_fresh] if wanted[i]]


def _sponsor(plan: _Plan) -> None:
    cfg = plan.config
    if not cfg.sponsored_items or cfg.sponsored_max == 0:
        return
    listed = frozenset(cfg.sponsored_items)
    wanted = [i in listed for i in plan.ranked.item_ids]
    placed: list[int] = []
    for slot in cfg.sponsored_slots:
        if len(placed) == cfg.sponsored_max:
            break
        if (placed and slot - placed[-1] < cfg.sponsored_min_spacing) or not plan.can_pin(slot):
            continue
        pool = _eligible(plan, slot, wanted)
        if pool:  # the best-ranked sponsored item: an ad the user is likeliest to want
            plan.pin(slot, pool[0], REASON_SPONSORED)
            placed.append(slot)


def _explore(plan: _Plan, rng: np.random.Generator | None) -> None:
    cfg = plan.config
    if cfg.explore_epsilon <= 0.0 or not cfg.explore_slots:
        return
    rng = rng if rng is not None else np.random.default_rng(0)
    # A fixed number of draws per request, so one request id always explores the same way whatever the pool.
    coins, picks = rng.random(len(cfg.explore_slots)), rng.random(len(cfg.explore_slots))
    new = plan.new()
    for slot, coin, pick in zip(cfg.explore_slots, coins, picks):
        if not plan.can_pin(slot):
            continue
        pool = _eligible(plan, slot, new)
        if pool:
            plan.explore_pools[slot] = len(pool)  # whether or not the coin fires: the propensities need both
        if pool and coin < cfg.explore_epsilon:  # uniform over the new items below the slot: it does not rank
            plan.pin(slot, pool[int(pick * len(pool))], REASON_EXPLORE)


def _quotas(plan: _Plan) -> None:
    cfg = plan.config
    cap, max_new, min_new = cfg.max_per_category, cfg.max_new, cfg.min_new
    if cap is None and max_new is None and min_new == 0:
        return
    k = min(cfg.quota_k, len(plan.order) + len(plan.pins))
    cats, new = plan.ranked.categories, plan.new()
    pinned = [i for s, i in plan.pins.items() if s < k]
    n_cat = Counter(cats[i] for i in pinned)
    n_new = sum(new[i] for i in pinned)
    fresh = plan.order[:plan.n_fresh]
    need = k - len(pinned)
    selected: list[int] = []  # positions in `fresh`
    pushed: dict[int, str] = {}
    j = 0
    while j < len(fresh) and len(selected) < need:  # greedy in rank order under the upper bounds
        i = fresh[j]
        if cap is not None and n_cat[cats[i]] >= cap:
            pushed[j] = REASON_CATEGORY
        elif new[i] and max_new is not None and n_new >= max_new:
            pushed[j] = REASON_NOVELTY
        else:
            selected.append(j)
            n_cat[cats[i]] += 1
            n_new += new[i]
        j += 1
    if n_new < min_new:  # swap the best left-out new items for the lowest selected old ones, caps permitting
        chosen = set(selected)
        victims = [q for q in reversed(selected) if not new[fresh[q]]]
        for q in (q for q in range(len(fresh)) if q not in chosen and new[fresh[q]]):
            if n_new >= min_new:
                break
            c = cats[fresh[q]]
            if len(selected) < need:  # room left (few fresh items): no victim needed
                if cap is None or n_cat[c] < cap:
                    selected.append(q)
                    n_cat[c] += 1
                    n_new += 1
                    pushed[q] = REASON_NOVELTY
                continue
            if not victims:
                break
            v = victims[0]
            if cap is not None and n_cat[c] - (cats[fresh[v]] == c) >= cap:
                continue
            victims.pop(0)
            selected.remove(v)
            selected.append(q)
            n_cat[cats[fresh[v]]] -= 1
            n_cat[c] += 1
            n_new += 1
            pushed[v] = pushed[q] = REASON_NOVELTY
    chosen = sorted(selected)
    keep = set(chosen)
    for q, reason in pushed.items():
        plan.reasons[fresh[q]] = reason
    plan.order = [fresh[q] for q in chosen] + [fresh[q] for q in range(len(fresh)) if q not in keep] \
        + plan.order[plan.n_fresh:]
    plan.n_quota = len(chosen)


def _feasible(counts: list[int], n_left: int, tail: int, tail_run: int, max_run: int) -> bool:
    """Whether the remaining items (``counts`` per brand code) can follow a tail of ``tail_run`` items of brand
    ``tail`` (-1 for none) with no run longer than ``max_run``.

    A brand with c items needs ceil(c / r) blocks, hence ceil(c / r) - 1 separators from the other brands:
    c <= r * (others + 1). The tail's items count towards its own brand's first block. The condition is checked
    for the tail brand and for the largest other brand (the hardest one); it is also sufficient, which
    tests/unit/test_policy.py checks against brute force.
    """
    if tail >= 0 and counts[tail] + tail_run > max_run * (n_left - counts[tail] + 1):
        return False
    c_max = max((c for j, c in enumerate(counts) if j != tail), default=0)
    return c_max <= max_run * (n_left - c_max + 1)


def _diversify_segment(codes: list[int], n_codes: int, seg: list[int], pins: dict[int, int], r: int,
                       state: list[int], out: list[int]) -> list[int]:
    """Appends ``seg`` (original indices, best first) to ``out`` in greedy least-displacement order with no brand
    run longer than ``r`` whenever achievable; pinned slots of ``out`` are emitted as they come. ``state`` is
    [last brand code, run length], carried across segments. Returns the items placed below their former slot.

    At each slot take the best remaining item, unless its brand would break the run limit, or would leave a rest
    that cannot be arranged (``_feasible``), or would run into the next pinned item: then the best item of another
    brand. A brand past the feasibility bound ("critical", at most one at a time) is placed at once. Data
    structures: a cursor over the segment and a queue of the items skipped over, which all share one brand (the
    one being avoided), so "best remaining" and "best of another brand" are O(1) amortised.
    """
    m = len(seg)
    cs = [codes[i] for i in seg]
    counts = [0] * n_codes
    for c in cs:
        counts[c] += 1
    last, run = state
    look_ahead = m > 0 and _feasible(counts, m, last, run, r)
    c_max = max(counts) if m else 0  # an upper bound of the largest count; exact after each recomputation
    taken = [False] * m
    skipped: deque[int] = deque()
    cursor, moved = 0, []
    for k in range(m):
        while len(out) in pins:  # a pinned slot is fixed; it only continues or breaks the run
            b = codes[pins[len(out)]]
            out.append(pins[len(out)])
            run, last = (run + 1 if b == last else 1), b
        n_left = m - k - 1
        while cursor < m and taken[cursor]:
            cursor += 1
        best = skipped[0] if skipped else cursor
        bb = cs[best]
        pos = -1
        if look_ahead and c_max * (r + 1) > r * (n_left + 1):
            c_max = max(counts)
            if c_max * (r + 1) > r * (n_left + 1):
                crit = counts.index(c_max)
                if skipped and cs[skipped[0]] == crit:
                    pos = skipped.popleft()
                else:
                    pos = cursor
                    while taken[pos] or cs[pos] != crit:
                        pos += 1
                    taken[pos] = True
        if pos < 0:
            avoid = bb == last and (run >= r or (look_ahead and counts[last] + run > r * (n_left - counts[last] + 2)))
            nxt = pins.get(len(out) + 1)
            if not avoid and nxt is not None and codes[nxt] == bb:
                avoid = (run + 1 if bb == last else 1) >= r
            if avoid:  # best item of another brand: skip past the avoided brand's items after the cursor
                j = cursor
                while j < m and (taken[j] or cs[j] == bb):
                    if not taken[j]:
                        skipped.append(j)
                    j += 1
                cursor = j
                if j < m:
                    pos, taken[j] = j, True
            if pos < 0:
                if skipped:
                    pos = skipped.popleft()
                else:
                    pos, taken[cursor] = cursor, True
        b = cs[pos]
        counts[b] -= 1
        run, last = (run + 1 if b == last else 1), b
        out.append(seg[pos])
        if k > pos:
            moved.append(seg[pos])
    state[0], state[1] = last, run
    return moved


def _diversify(plan: _Plan) -> None:
    """Brand diversity over the segments [quota top | other fresh | recently bought] of the order, with the run
    carried across their borders, so it never undoes the quotas or the down-sort; pinned slots stay put."""
    vocab: dict[str, int] = {}
    codes = [vocab.setdefault(b, len(vocab)) for b in plan.ranked.brands]
    bounds = sorted({0, plan.n_quota, plan.n_fresh, len(plan.order)})
    state, out = [-1, 0], []
    for lo, hi in zip(bounds, bounds[1:]):
        for i in _diversify_segment(codes, len(vocab), plan.order[lo:hi], plan.pins, plan.config.max_brand_run,
                                    state, out):
            plan.reasons[i] = REASON_BRAND
    pinned = set(plan.pins.values())
    plan.order = [i for i in out if i not in pinned] if pinned else out


def _run(ranked: RankedList, user: UserState, config: PolicyConfig, steps: Sequence) -> RankedList:
    plan = _Plan(ranked, user, config)
    for step in steps:
        step(plan)
    return plan.result()


def filter_items(ranked: RankedList, user: UserState, config: PolicyConfig,
                 rng: np.random.Generator | None = None) -> RankedList:
    """Drops items of ``blocked_brands``/``blocked_categories`` and, with ``filter_out_of_stock``, items whose
    ``in_stock`` is False; the rest keep their order and reasons."""
    return _run(ranked, user, config, [_filter])


def down_sort_bought(ranked: RankedList, user: UserState, config: PolicyConfig,
                     rng: np.random.Generator | None = None) -> RankedList:
    """Moves items bought within ``config.bought_window_days`` before ``user.now`` below all other items.

    Both groups keep their relative order (a stable partition). Bought items that actually moved get the reason
    ``"policy:bought_down_sort"``; purchases older than the window do not count.
    """
    return _run(ranked, user, config, [_down_sort])


def place_sponsored(ranked: RankedList, user: UserState, config: PolicyConfig,
                    rng: np.random.Generator | None = None) -> RankedList:
    """Pins items of ``config.sponsored_items`` to ``sponsored_slots``: for each slot in turn (at most
    ``sponsored_max``, at least ``sponsored_min_spacing`` apart), the best-ranked listed item currently below it.
    A listed item already above a slot stays where it is; recently bought items are never promoted (with the
    down-sort on). Placed items get ``"policy:sponsored"``."""
    return _run(ranked, user, config, [_sponsor])


def explore_new_items(ranked: RankedList, user: UserState, config: PolicyConfig,
                      rng: np.random.Generator | None = None) -> RankedList:
    """Epsilon-greedy exploration: for each of ``explore_slots``, with probability ``explore_epsilon``, pins a
    new item (created within ``new_item_days``) drawn uniformly from those below the slot. Draws 2 numbers per
    slot from ``rng`` (``request_rng(request_id)`` makes it reproducible; None means seed 0). Placed items get
    ``"policy:explore"``."""
    return _run(ranked, user, config, [lambda plan: _explore(plan, rng)])


def apply_quotas(ranked: RankedList, user: UserState, config: PolicyConfig,
                 rng: np.random.Generator | None = None) -> RankedList:
    """Chooses the top ``quota_k`` items in rank order so that no category exceeds ``max_per_category`` and new
    items stay within [``min_new``, ``max_new``]: the upper bounds skip items (pushed below the top, reason
    ``"policy:category_quota"``/``"policy:novelty_quota"``), then the best left-out new items replace the lowest
    chosen old ones until ``min_new`` holds (both marked ``"policy:novelty_quota"``). Upper bounds always hold;
    ``min_new`` holds when enough new items exist under the category cap. Both groups keep their rank order."""
    return _run(ranked, user, config, [_quotas])


def diversify_brands(ranked: RankedList, user: UserState, config: PolicyConfig,
                     rng: np.random.Generator | None = None) -> RankedList:
    """Reorders so no brand appears more than ``config.max_brand_run`` times in a row, moving items as little
    as possible (greedy: the best remaining item that keeps the rest arrangeable, see ``_diversify_segment``).

    When the brand mix makes the rule impossible (e.g. for max_run 1, a brand with more than ceil(n / 2) items),
    the rule holds as long as it can and the leftover items follow in order. Items that the rule placed below
    their former slot get the reason ``"policy:brand_diversity"``; other reasons are kept.
    """
    return _run(ranked, user, config, [_diversify])


def apply_policy(ranked: RankedList, user: UserState, config: PolicyConfig,
                 rng: np.random.Generator | None = None) -> RankedList:
    """Applies the enabled rules in the order of the module docstring and returns the final list.

    The down-sort is the hardest rule: no later rule lifts a recently bought item above another. Quotas and brand
    diversity respect the pinned sponsored and exploration slots.

    Args:
        ranked: the ranked list, best first (n items).
        user: the user's purchases and the request time.
        config: which rules run and their knobs (already resolved for the page, see ``PolicyConfig.for_page``).
        rng: exploration's generator, e.g. ``request_rng(request_id)``.

    Returns:
        The filtered items (n' <= n, every unfiltered item kept) in their final order, with updated reasons.
    """
    steps = [_filter]
    if config.bought_down_sort:
        steps.append(_down_sort)
    steps += [_sponsor, lambda plan: _explore(plan, rng), _quotas]
    if config.brand_diversity:
        steps.append(_diversify)
    final = _run(ranked, user, config, steps)
    return _shuffle(final, config, rng) if config.shuffle_epsilon > 0.0 else final


def shuffle_marginal(base: Sequence[str], shown: Sequence[str], config: PolicyConfig) -> np.ndarray:
    """(len(shown),) P(shown[k] at position k) under the shuffle rule, given ``base``, the list the other rules
    made (fixed by the request's draws): for k < n = min(shuffle_top, len(base)),
    (1 - eps) [base[k] = shown[k]] + eps / n [shown[k] in base[:n]] (a uniformly random order of n items puts each
    at each position with probability 1 / n); [base[k] = shown[k]] below. Exact, not a bound."""
    eps = config.shuffle_epsilon
    n = min(config.shuffle_top, len(base)) if eps > 0.0 else 0
    top = set(base[:n])
    out = np.zeros(len(shown), dtype=np.float64)
    for k, item in enumerate(shown):
        same = k < len(base) and base[k] == item
        out[k] = (1.0 - eps) * same + eps / n * (item in top) if k < n else float(same)
    return out


def _shuffle(final: RankedList, config: PolicyConfig, rng: np.random.Generator | None) -> RankedList:
    rng = rng if rng is not None else np.random.default_rng(0)
    # A fixed number of draws, after exploration's: the same request id always shuffles the same way.
    coin, keys = rng.random(), rng.random(config.shuffle_top)
    eps, n = config.shuffle_epsilon, min(config.shuffle_top, len(final))
    shown = final
    if coin < eps and n >= 2:
        order = [int(i) for i in np.argsort(keys[:n], kind="stable")] + list(range(n, len(final)))
        shown = final.take(order)
        shown.reasons = [REASON_SHUFFLE if order[k] != k else r for k, r in enumerate(shown.reasons)]
    # The other rules' own probability of an item at its slot (exploration's), times the shuffle's.
    base_p = final.propensity if final.propensity is not None else np.ones(len(final))
    same = np.array([a == b for a, b in zip(shown.item_ids, final.item_ids)], dtype=bool)
    top = np.arange(len(final)) < n
    shown.propensity = np.where(top, (1.0 - eps) * same * base_p + eps / max(n, 1), base_p)
    return shown


RULES = {
    "filter": filter_items, "bought_down_sort": down_sort_bought, "sponsored": place_sponsored,
    "explore": explore_new_items, "quotas": apply_quotas, "brand_diversity": diversify_brands,
}
