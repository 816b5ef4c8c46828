"""The online store's contract, run against both backends: the embedded `RecentActions` (in process) and Redis (a
real `redis-server` started by the project's own script, cluster/redis_server.py)."""
from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pyarrow as pa
import pytest

from deployments.redis_store import RedisActions
from deployments.store import RecentActions, empty_state, local_store


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["embedded", "redis"])
def make_store(request):
    """A factory of empty stores of one backend: make_store(max_recent=..., max_views=...)."""
    made: list[RedisActions] = []

    def make(**limits):
        if request.param == "embedded":
            return local_store(RecentActions(**limits))
        url = request.getfixturevalue("redis_url")
        run(_flush(url))
        store = RedisActions(url, **limits)
        made.append(store)
        return store
    yield make


async def _flush(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.aclose()


def ev(user, item, action, ts, position=None, context=None):
    return {"user_id": user, "item_id": item, "action": action, "ts": ts, "position": position, "context": context}


def test_keeps_recent_engagements_in_time_order_and_the_latest_purchase(make_store):
    store = make_store(max_recent=3)

    async def go():
        n = await store.append([ev("u", f"i{k}", "click", float(10 - k)) for k in range(5)]
                               + [ev("u", "i9", "view", 20.0), ev("u", "i7", "purchase", 30.0),
                                  ev("u", "i7", "purchase", 25.0)])
        return n, await store.get("u"), await store.get("nobody")
    n, state, nobody = run(go())
    assert n == 8
    # the 3 engagements that arrived last, oldest first
    assert state["items"] == ["i4", "i7", "i7"] and state["timestamps"] == [6.0, 25.0, 30.0]
    assert state["actions"] == ["click", "purchase", "purchase"]
    assert state["bought_at"] == {"i7": 30.0}  # the later purchase wins, whatever the arrival order
    assert state["views"] == 1  # views are counted, not kept among the engagements
    assert "i9" not in state["items"]
    assert nobody == empty_state()


def test_views_are_counted_and_bounded_per_user(make_store):
    store = make_store(max_views=4)

    async def go():
        await store.append([ev("u", f"v{k}", "view", float(k)) for k in range(10)])
        return await store.get("u"), await store.recent_views("u"), await store.stats()
    state, views, stats = run(go())
    assert state["views"] == 10 and state["items"] == []
    assert views == [(f"v{k}", float(k)) for k in range(6, 10)]
    assert stats["views"] == 10 and stats["events"] == 10 and stats["users"] == 0


def test_the_event_log_keeps_position_and_context(make_store):
    store = make_store()
    ctx = {"page": "search", "query": "red shoes", "country": "DE"}

    async def go():
        await store.append([ev("u", "a", "view", 1.5, position=3, context=ctx), ev("w", "b", "add_to_cart", 2.0)])
        return await store.recent_log(10)
    log = run(go())
    assert log == [ev("u", "a", "view", 1.5, 3, ctx), ev("w", "b", "add_to_cart", 2.0)]


def test_stats_count_users_engagements_and_events(make_store):
    store = make_store(max_recent=2)

    async def go():
        await store.append([ev("u", "a", "click", 1.0), ev("u", "b", "click", 2.0), ev("u", "c", "click", 3.0),
                            ev("w", "a", "wishlist", 1.0), ev("w", "a", "view", 1.0)])
        return await store.stats()
    stats = run(go())
    assert {k: stats[k] for k in ("users", "engagements", "views", "events")} == {
        "users": 2, "engagements": 3, "views": 1, "events": 5}


def _history() -> pa.Table:
    t = [datetime(2026, 1, 1, 0, 0, s, tzinfo=timezone.utc) for s in (3, 1, 2)]
    return pa.table({"user_id": ["u", "u", "w"], "item_id": ["a", "b", "c"], "timestamp": pa.array(t, pa.timestamp(
        "ms", tz="UTC")), "action": ["purchase", "click", "view"], "position": pa.array([None, 2, 0], pa.int32())})


def test_a_shop_history_seeds_both_backends_alike_and_is_not_logged(redis_url):
    run(_flush(redis_url))
    embedded = RecentActions(seed_events=_history())
    redis = RedisActions(redis_url)

    async def go():
        assert await redis.seed(_history(), "snap-1") is True
        assert await redis.seed(_history(), "snap-1") is False  # a restart keeps what was posted since
        with pytest.raises(ValueError, match="snap-1"):
            await redis.seed(_history(), "snap-2")
        return await redis.get("u"), await redis.get("w"), await redis.recent_log(10)
    u, w, log = run(go())
    assert u == embedded.get("u") and w == embedded.get("w")
    assert u["items"] == ["b", "a"] and u["bought_at"] == {"a": pytest.approx(1767225603.0)}
    assert log == [] and embedded.recent_log() == []


def test_redis_store_pickles_without_its_connection(redis_url):
    import pickle

    run(_flush(redis_url))
    store = RedisActions(redis_url)
    run(store.append([ev("u", "a", "click", 1.0)]))
    copy = pickle.loads(pickle.dumps(store))
    assert run(copy.get("u"))["items"] == ["a"]
