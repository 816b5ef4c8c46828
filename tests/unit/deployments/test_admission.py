"""The ingress's adaptive concurrency limit: admits up to the limit, grows it while admitted requests stay near the
baseline latency, shrinks it when they queue, and never drops below one."""
from __future__ import annotations

import pytest

from deployments.ingress.admission import AdaptiveLimit


def test_admits_up_to_the_limit_and_sheds_beyond_it():
    limit = AdaptiveLimit(initial=2)
    assert limit.try_admit() and limit.try_admit()
    assert not limit.try_admit() and limit.stats()["shed"] == 1
    limit.done(0.05)
    assert limit.try_admit() and limit.stats()["admitted"] == 3


def test_fast_answers_grow_the_limit_to_its_ceiling_and_slow_ones_shrink_it_to_one():
    limit = AdaptiveLimit(initial=4, max_limit=16)
    for _ in range(500):
        assert limit.try_admit()
        limit.done(0.03)
    assert limit.limit == 16
    for _ in range(200):
        limit.try_admit()
        limit.done(0.03 * 5)  # five times the baseline: the stages are queueing
    assert limit.limit == 1 and limit.inflight == 0
    assert limit.try_admit() and not limit.try_admit()  # one request at a time still gets through


def test_the_limit_settles_where_latency_starts_to_rise():
    """A stage that answers in 30 ms up to 3 requests at once and queues beyond (latency grows with concurrency):
    the limit ends near the knee, not at the ceiling."""
    limit = AdaptiveLimit(initial=4, max_limit=32)
    for _ in range(3000):
        n = max(1, int(limit.limit))
        for _ in range(n):
            limit.try_admit()
        for _ in range(n):
            limit.done(0.03 * max(1.0, n / 3.0) ** 2)
    assert 3 <= limit.limit <= 8


def test_the_baseline_follows_a_machine_that_became_slower():
    limit = AdaptiveLimit(initial=4)
    for _ in range(50):
        limit.try_admit()
        limit.done(0.02)
    for _ in range(2000):
        limit.try_admit()
        limit.done(0.1)  # every request now takes 5x the old baseline, and keeps taking it
    assert limit.stats()["baseline_ms"] >= 50 and limit.limit > 4


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError, match="admission"):
        AdaptiveLimit(initial=0.5)
