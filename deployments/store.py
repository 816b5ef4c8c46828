"""The online store: each user's recent engagements, views and purchases, read on every request and fed by
POST /events. Two backends behind one interface (`StoreClient`: async `get`, `append`, `stats`):

- embedded (the demo's default): `RecentActions`, a plain class (unit-tested without Ray), in one named detached
  actor (`recsys-online-store`) that the ingress reads directly, one actor call per request. The actor restarts
  when it dies and re-reads the shop's event history; what a restart loses is every event posted since
  (`/events` answers say so: `durable: false`).
- Redis (`deployments.redis_store.RedisActions`): the same state in a `redis-server` with append-only persistence,
  shared by every ingress replica, surviving restarts of Redis and of the whole application.

`open_store(spec)` picks one: "embedded", or a `redis://host:port/db` URL. The same unit tests run against both
(tests/unit/deployments/test_store.py).

An event is {user_id, item_id, action, ts (unix seconds), position (0-based slot or None), context (dict or None)}.
Engagements (every action but a view) are kept, the last `max_recent` per user, with the latest purchase time per
item; views are counted and the last `max_views` kept per user; every posted event, with its position and context,
goes to a bounded event log (the raw material of later training).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import pyarrow as pa
import ray

from deployments.calls import ActorCalls, LocalCalls
from training import NAMESPACE
from training.data.features import ENGAGEMENTS, time_ms

STORE_NAME = "recsys-online-store"
EMBEDDED = "embedded"
MAX_RECENT = 50  # engagements kept per user: the towers read the last 20, the rest is headroom for later models
MAX_VIEWS = 50  # views kept per user (all are counted)
MAX_LOG = 100_000  # posted events the embedded log keeps (the newest); Redis keeps MAX_LOG * 10 in its stream
CONTEXT_KEYS = ("country", "device", "page", "category", "query")


def empty_state() -> dict[str, Any]:
    """The state of a user the store knows nothing about."""
    return {"items": [], "actions": [], "timestamps": [], "bought_at": {}, "views": 0}


def shop_history(events: pa.Table) -> Iterator[dict[str, Any]]:
    """A shop's event log (EVENTS_SCHEMA) as store events in time order, the context from its columns."""
    ts = time_ms(events.column("timestamp")) / 1000.0
    order = np.argsort(ts, kind="stable")
    cols = {c: np.asarray(events.column(c).to_pylist(), dtype=object)[order]
            for c in ("user_id", "item_id", "action", "position")}
    for u, i, a, p, t in zip(cols["user_id"], cols["item_id"], cols["action"], cols["position"], ts[order]):
        yield {"user_id": u, "item_id": i, "action": a, "ts": float(t), "position": p, "context": None}


class RecentActions:
    """The embedded backend's state: per user the recent engagements (item, action, unix seconds), the latest
    purchase time per item and the views; plus the bounded log of posted events."""

    def __init__(self, max_recent: int = MAX_RECENT, max_views: int = MAX_VIEWS, max_log: int = MAX_LOG,
                 seed_events: pa.Table | None = None, seed_dir: str | None = None) -> None:
        """seed_events, or the events of the shop folder seed_dir: the history loaded first (a path, not a table,
        for the actor: its constructor runs again on every restart, long after the caller's table is gone)."""
        self.max_recent, self.max_views = max_recent, max_views
        self._recent: dict[str, deque[tuple[str, str, float]]] = {}
        self._bought: dict[str, dict[str, float]] = {}
        self._views: dict[str, deque[tuple[str, float]]] = {}
        self._view_counts: dict[str, int] = {}
        self.log: deque[dict[str, Any]] = deque(maxlen=max_log)
        self.n_events = self.n_views = 0
        if seed_dir is not None:
            from training.data.schemas import read_shop

            seed_events = read_shop(seed_dir).events
        if seed_events is not None:
            self.load_events(seed_events)

    def _add(self, e: dict[str, Any]) -> None:
        user, item, ts = e["user_id"], e["item_id"], float(e["ts"])
        self.n_events += 1
        if e["action"] not in ENGAGEMENTS:
            self.n_views += 1
            self._view_counts[user] = self._view_counts.get(user, 0) + 1
            self._views.setdefault(user, deque(maxlen=self.max_views)).append((item, ts))
            return
        self._recent.setdefault(user, deque(maxlen=self.max_recent)).append((item, e["action"], ts))
        if e["action"] == "purchase":
            bought = self._bought.setdefault(user, {})
            bought[item] = max(ts, bought.get(item, 0.0))

    def append(self, events: Iterable[dict[str, Any]]) -> int:
        """Adds posted events (see the module docstring) and logs them; returns how many were accepted."""
        n = 0
        for e in events:
            self._add(e)
            self.log.append({"user_id": e["user_id"], "item_id": e["item_id"], "action": e["action"],
                             "ts": float(e["ts"]), "position": e.get("position"), "context": e.get("context")})
            n += 1
        return n

    def get(self, user_id: str) -> dict[str, Any]:
        """The user's state, oldest engagement first; `empty_state()` for an unknown user."""
        recent = sorted(self._recent.get(user_id, ()), key=lambda r: r[2])
        return {"items": [r[0] for r in recent], "actions": [r[1] for r in recent],
                "timestamps": [r[2] for r in recent], "bought_at": dict(self._bought.get(user_id, {})),
                "views": self._view_counts.get(user_id, 0)}

    def recent_views(self, user_id: str) -> list[tuple[str, float]]:
        return list(self._views.get(user_id, ()))

    def recent_log(self, n: int = 100) -> list[dict[str, Any]]:
        """The newest `n` posted events, oldest first, with their position and context."""
        return list(self.log)[-n:] if n > 0 else []

    def load_events(self, events: pa.Table) -> int:
        """Bulk-loads an event log (EVENTS_SCHEMA), e.g. the shop's history when serving starts; not logged again."""
        n = 0
        for e in shop_history(events):
            self._add(e)
            n += 1
        return n

    def stats(self) -> dict[str, Any]:
        return {"backend": EMBEDDED, "durable": False, "users": len(self._recent),
                "engagements": sum(len(q) for q in self._recent.values()), "views": self.n_views,
                "events": self.n_events}


class StoreClient(Protocol):
    """What the ingress needs of the online store."""

    async def get(self, user_id: str) -> dict[str, Any]: ...

    async def append(self, events: list[dict[str, Any]]) -> int: ...

    async def stats(self) -> dict[str, Any]: ...

    async def recent_views(self, user_id: str) -> list[tuple[str, float]]: ...

    async def recent_log(self, n: int = 100) -> list[dict[str, Any]]: ...


def actor_store(name: str = STORE_NAME) -> StoreClient:
    """The cluster's store actor, reached by name."""
    return ActorCalls(ray.get_actor(name, namespace=NAMESPACE))


def local_store(state: RecentActions | None = None) -> StoreClient:
    """A `RecentActions` in this process: the store of Serve's local testing mode."""
    return LocalCalls(state or RecentActions())


def open_store(spec: str = EMBEDDED) -> StoreClient:
    """The store a replica reads: "embedded" (the cluster's store actor) or a redis:// URL."""
    if spec == EMBEDDED:
        return actor_store()
    if spec.startswith(("redis://", "rediss://", "unix://")):
        from deployments.redis_store import RedisActions

        return RedisActions(spec)
    raise ValueError(f"serving.store must be 'embedded' or a redis:// URL, got {spec!r}")


def create_store(shop_dir: str | None = None, cpus: float = 0.05) -> ray.actor.ActorHandle:
    """The named embedded store actor, created on first use and seeded with the history of the shop in `shop_dir`
    (a path every node can read).

    It restarts without limit when its process dies, re-seeding itself from the same history; calls made while it
    restarts fail fast (the ingress then answers from the request's context, flagged), never hang.
    """
    return ray.remote(RecentActions).options(
        name=STORE_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=cpus,
        max_restarts=-1, max_task_retries=0).remote(seed_dir=shop_dir)
