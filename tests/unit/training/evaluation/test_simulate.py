"""The closed-loop users' behaviour (training/evaluation/simulate.py): the generator's click model on served lists."""
from __future__ import annotations

import numpy as np
import pytest

from training.data.synthetic import P_CART_SCALE, generate_shop, position_bias, true_relevance
from training.evaluation.simulate import draw_interest, rate_interval, session_outcomes


@pytest.fixture(scope="module")
def hidden():
    return generate_shop("tiny", 0).hidden


def test_clicks_follow_true_relevance_times_position_bias_and_the_funnel_nests(hidden):
    user, interest = 3, 0
    r = true_relevance(hidden, np.arange(2000) * 0 + user, np.arange(2000), np.zeros(2000, dtype=int) + interest)
    best = int(np.argmax(r))
    items = np.array([best, best, -1])  # the best item first and second, then one the shop does not know
    rng = np.random.default_rng(0)
    outs = [session_outcomes(hidden, user, items, interest, rng) for _ in range(4000)]
    clicks = np.mean([o.click for o in outs], axis=0)
    assert clicks[0] == pytest.approx(r[best] * position_bias(np.array([0]))[0], abs=0.03)
    assert clicks[1] == pytest.approx(r[best] * position_bias(np.array([1]))[0], abs=0.03)
    assert clicks[2] == 0.0 and all(o.relevance[2] == 0.0 for o in outs[:5])
    for o in outs[:500]:
        assert not (o.purchase & ~o.add_to_cart).any() and not (o.add_to_cart & ~o.click).any()
        assert not (o.wishlist & ~o.click).any()
    carts = np.mean([o.add_to_cart[0] for o in outs])
    assert carts == pytest.approx(clicks[0] * P_CART_SCALE * r[best], abs=0.02)


def test_clicks_follow_the_shops_own_examination_curve(hidden):
    from training.data.synthetic import Examination

    user, interest = 3, 0
    r = true_relevance(hidden, np.arange(2000) * 0 + user, np.arange(2000), np.zeros(2000, dtype=int) + interest)
    items = np.full(4, int(np.argmax(r)))
    steep = Examination.parse("exponential:0.4")
    rng = np.random.default_rng(1)
    clicks = np.mean([session_outcomes(hidden, user, items, interest, rng, steep).click for _ in range(4000)], axis=0)
    np.testing.assert_allclose(clicks, r[items] * steep.probability(np.arange(4)), atol=0.03)


def test_interests_are_drawn_by_the_users_weights(hidden):
    rng = np.random.default_rng(1)
    user = int(np.argmax((hidden["user_interest_weight"] > 0).sum(1)))  # a user with several interests
    w = hidden["user_interest_weight"][user] / hidden["user_interest_weight"][user].sum()
    drawn = np.bincount([draw_interest(hidden, user, rng) for _ in range(5000)], minlength=len(w)) / 5000
    np.testing.assert_allclose(drawn, w, atol=0.03)


def test_rate_interval_is_the_mean_with_a_normal_95_interval():
    x = np.array([0, 1, 0, 2, 1, 0, 0, 1], dtype=float)
    out = rate_interval(x)
    se = x.std(ddof=1) / np.sqrt(len(x))
    assert out["mean"] == pytest.approx(0.625) and out["hi"] - out["mean"] == pytest.approx(1.96 * se)
    assert rate_interval(np.array([]))["sessions"] == 0
