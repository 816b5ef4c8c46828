"""The closed-loop shop's users: how a synthetic shop's user responds to a list a live service showed them.

The behaviour is the generator's own (training/data/synthetic.py), applied to what the service served instead of to
the generator's logged lists: a session has one of the user's interests (drawn by the user's interest weights);
an item at 0-based position p is clicked with probability r(user, interest, item) x examination(p), the shop's
position bias (`training.data.synthetic.Examination`), where r is the hidden true relevance; a click leads to a wishlist (P_WISHLIST), an add-to-cart (P_CART_SCALE x r) and then
a purchase (P_PURCHASE), as in the generator's funnel. Items the shop does not know (added live) have r = 0.

`session_outcomes` is plain NumPy; `cluster/simulate.py` sends the requests and posts the events.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.data.synthetic import P_CART_SCALE, P_PURCHASE, P_WISHLIST, Examination, true_relevance


@dataclass
class Outcome:
    """One session's response to one answer: per shown item, whether each funnel step happened."""

    click: np.ndarray  # (k,) bool
    wishlist: np.ndarray
    add_to_cart: np.ndarray
    purchase: np.ndarray
    relevance: np.ndarray  # (k,) the hidden r of each shown item for the session's interest


def draw_interest(hidden: dict, user_row: int, rng: np.random.Generator) -> int:
    """One of the user's interest slots, by the user's interest weights (as the generator draws sessions)."""
    w = np.asarray(hidden["user_interest_weight"][user_row], dtype=np.float64)
    return int(rng.choice(len(w), p=w / w.sum()))


def session_outcomes(hidden: dict, user_row: int, item_rows: np.ndarray, interest: int, rng: np.random.Generator,
                     examination: Examination = Examination()) -> Outcome:
    """The funnel for the items shown at positions 0..k-1 (catalog rows, -1 for an item the shop does not know),
    under the shop's position bias (`Examination.of_meta(shop.meta)`)."""
    item_rows = np.asarray(item_rows, dtype=np.int64)
    known = item_rows >= 0
    r = np.zeros(len(item_rows))
    if known.any():
        r[known] = true_relevance(hidden, np.full(known.sum(), user_row), item_rows[known],
                                  np.full(known.sum(), interest))
    click = rng.random(len(r)) < r * examination.probability(np.arange(len(r)))
    wish = click & (rng.random(len(r)) < P_WISHLIST)
    cart = click & (rng.random(len(r)) < P_CART_SCALE * r)
    buy = cart & (rng.random(len(r)) < P_PURCHASE)
    return Outcome(click, wish, cart, buy, r)


def rate_interval(per_session: np.ndarray, z: float = 1.96) -> dict[str, float]:
    """Mean over sessions with a normal-approximation 95% interval (sessions are independent draws)."""
    x = np.asarray(per_session, dtype=np.float64)
    if len(x) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "sessions": 0}
    se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0
    return {"mean": float(x.mean()), "lo": float(x.mean() - z * se), "hi": float(x.mean() + z * se),
            "sessions": int(len(x))}
