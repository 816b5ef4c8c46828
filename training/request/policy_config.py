"""The policy stage's configuration: every rule's switches and knobs, validated on construction so each path
(YAML, Serve `user_config`, the admin endpoint, per-request overrides) gets the same errors naming the field, and
the presets by surface (`page`). The rules themselves are in `training.request.policy`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

# Bounds that keep one config (and one error message) small, whoever sends it.
MAX_NAMES = 1000  # blocked brands or categories
MAX_SPONSORED = 100  # sponsored items pinned into one answer's ranking
MAX_NAME = 128  # characters of a brand, category or item id
MAX_SLOTS, MAX_SLOT = 100, 10_000  # explore/sponsored slot lists and slot numbers
MAX_SURFACES, MAX_PAGE = 64, 32  # presets, and the length of a page name (as the HTTP context allows)

# Presets by surface, applied on top of the base config for a request's `page`. Home is a discovery surface (some
# exploration, no category hogging the first screen); a category page is one category already, so it only asks for
# a new item up front; search honours the query, so a brand the shopper typed may come twice in a row.
DEFAULT_SURFACES: dict[str, dict[str, object]] = {
    "home": {"explore_epsilon": 0.1, "max_per_category": 6},
    "category": {"min_new": 1},
    "search": {"max_brand_run": 2},
}


def _bad(name: str, expected: str, value: object) -> ValueError:
    return ValueError(f"PolicyConfig.{name} must be {expected}, got {value!r}")


def _short(value: object, limit: int = 120) -> str:
    """A value's repr cut to `limit` characters, for error messages about values that may be huge."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclass(frozen=True)
class PolicyConfig:
    """Switches and knobs of the policy stage; validated on construction, so every path (YAML, Serve
    ``user_config``, the admin endpoint, per-request overrides) gets the same errors, each naming the field."""

    # Filters. On by default: an unbuyable item in the top slots is a wasted slot and a support ticket.
    filter_out_of_stock: bool = True
    blocked_brands: tuple[str, ...] = ()
    blocked_categories: tuple[str, ...] = ()
    # On by default: re-showing what the user just bought wastes the top slots.
    bought_down_sort: bool = True
    # Two months covers the repeat-purchase gap of most durable goods; consumables want a shorter window.
    bought_window_days: float = 60.0
    # "New" for exploration and the novelty quota: created at most this long before the request (the shop's
    # cold-start window is one week).
    new_item_days: float = 7.0
    # Exploration: per slot, the probability that a random new item is promoted there. Off in the base config;
    # the home preset turns it on.
    explore_epsilon: float = 0.0
    explore_slots: tuple[int, ...] = (3, 9)  # 0-based; below the first screen's top, where a miss costs little
    # Logging exploration for off-policy evaluation: with probability `shuffle_epsilon` a request's first
    # `shuffle_top` items are shown in a uniformly random order, so each of them has probability at least
    # shuffle_epsilon / shuffle_top at each of those positions: the support `recsys replay --served` needs to
    # estimate other policies from served logs. Off by default: a shuffled screen costs clicks.
    shuffle_epsilon: float = 0.0
    shuffle_top: int = 12  # one screen
    # Sponsored slots: items of this list that rank below a slot are pinned there, at most `sponsored_max` per list
    # and at least `sponsored_min_spacing` slots apart.
    sponsored_items: tuple[str, ...] = ()
    sponsored_slots: tuple[int, ...] = (1, 6, 11)
    sponsored_max: int = 2
    sponsored_min_spacing: int = 4
    # Quotas over the first `quota_k` slots (one screen); None = no bound.
    quota_k: int = 20
    min_new: int = 0
    max_new: int | None = None
    max_per_category: int | None = None
    # On by default: a page of one brand reads as an ad, and users skim past it.
    brand_diversity: bool = True
    # 1 = no two consecutive items of one brand, the strictest rule and the usual merchandising default.
    max_brand_run: int = 1
    # page -> field overrides (no nesting); a given mapping replaces the defaults as a whole.
    surfaces: Mapping[str, Mapping[str, object]] = field(default_factory=lambda: dict(DEFAULT_SURFACES))

    def __post_init__(self) -> None:
        for name in ("filter_out_of_stock", "bought_down_sort", "brand_diversity"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise _bad(name, "a bool", value)
            self._set(name, bool(value))
        for name, lo, hi in (("bought_window_days", 0.0, math.inf), ("new_item_days", 0.0, math.inf),
                             ("explore_epsilon", 0.0, 1.0), ("shuffle_epsilon", 0.0, 1.0)):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
                raise _bad(name, f"a finite number in [{lo}, {hi}]", value)
            self._set(name, float(value))
        for name, lo in (("max_brand_run", 1), ("quota_k", 1), ("min_new", 0), ("sponsored_max", 0),
                         ("sponsored_min_spacing", 1), ("shuffle_top", 2)):
            value = getattr(self, name)
            if not _is_int(value) or value < lo:
                raise _bad(name, f"an int >= {lo}", value)
            self._set(name, int(value))
        for name in ("max_new", "max_per_category"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 0):
                raise _bad(name, "null or an int >= 0", value)
            self._set(name, None if value is None else int(value))
        for name in ("explore_slots", "sponsored_slots"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) > MAX_SLOTS or not all(
                    _is_int(s) and 0 <= s < MAX_SLOT for s in value) or list(value) != sorted(set(value)):
                raise _bad(name, f"a list of at most {MAX_SLOTS} distinct, increasing slot numbers in "
                                 f"[0, {MAX_SLOT})", _short(value))
            self._set(name, tuple(int(s) for s in value))
        for name, most in (("blocked_brands", MAX_NAMES), ("blocked_categories", MAX_NAMES),
                           ("sponsored_items", MAX_SPONSORED)):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) > most or not all(
                    isinstance(s, str) and 0 < len(s) <= MAX_NAME for s in value):
                raise _bad(name, f"a list of at most {most} non-empty strings of at most {MAX_NAME} characters",
                           _short(value))
            self._set(name, tuple(value))
        if self.max_new is not None and self.min_new > self.max_new:
            raise _bad("min_new", f"<= max_new ({self.max_new})", self.min_new)
        if self.min_new > self.quota_k:
            raise _bad("min_new", f"<= quota_k ({self.quota_k})", self.min_new)
        self._set("surfaces", self._checked_surfaces(self.surfaces))

    @property
    def randomised(self) -> bool:
        """Whether a rule draws random numbers (exploration, the logging shuffle): the request's rng matters."""
        return self.explore_epsilon > 0.0 or self.shuffle_epsilon > 0.0

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass's field in __post_init__

    def _checked_surfaces(self, surfaces: object) -> dict[str, dict[str, object]]:
        if not isinstance(surfaces, Mapping) or len(surfaces) > MAX_SURFACES:
            raise _bad("surfaces", f"a mapping page -> overrides of at most {MAX_SURFACES} pages", _short(surfaces))
        out = {}
        for page, overrides in surfaces.items():
            if not isinstance(page, str) or not 0 < len(page) <= MAX_PAGE or not isinstance(overrides, Mapping):
                raise _bad(f"surfaces.{page}", "a mapping of PolicyConfig fields", overrides)
            if "surfaces" in overrides:
                raise _bad(f"surfaces.{page}.surfaces", "absent (presets do not nest)", overrides["surfaces"])
            try:
                dataclasses.replace(self, surfaces={}).with_overrides(overrides)
            except ValueError as e:
                raise ValueError(f"PolicyConfig.surfaces.{page}: {e}") from e
            out[page] = dict(overrides)
        return out

    def with_overrides(self, overrides: Mapping[str, object] | None) -> PolicyConfig:
        """A copy with ``overrides`` applied; an unknown key or an invalid value raises ValueError naming it."""
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ValueError(f"PolicyConfig overrides must be a mapping of fields, got {overrides!r}")
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown PolicyConfig field(s) {unknown}; expected a subset of {sorted(known)}")
        return dataclasses.replace(self, **overrides)

    def for_page(self, page: str | None) -> PolicyConfig:
        """The config for a surface: this one with ``surfaces[page]`` applied (unchanged for an unknown page)."""
        return self.with_overrides(self.surfaces.get(page or ""))

    @classmethod
    def from_dict(cls, data: Mapping[str, object] | None) -> PolicyConfig:
        """Builds a config from a mapping (e.g. YAML, JSON); None gives the defaults."""
        return cls().with_overrides(data)

    def to_dict(self) -> dict:
        """JSON-able dict of every field (tuples as lists), the inverse of ``from_dict``."""
        out = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
