"""The online store: each user's recent engagements and purchases, read on every request and fed by POST /events.

`RecentActions` is the state, a plain class (unit-tested without Ray). For serving, one instance lives in a named
detached actor (`recsys-online-store`) that the ingress reads directly: a request's user state costs one actor call,
with no deployment hop in between. `StoreClient` is the interface the ingress sees (`actor_store()` in a cluster,
`local_store()` in process for Serve's local testing mode), and the seam where another backend plugs in.

What a restart loses: the embedded store lives in memory only. Killing the actor or stopping Ray loses every event
posted since the store was seeded from the shop's event log.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Iterable, Protocol

import numpy as np
import pyarrow as pa
import ray

from deployments.calls import ActorCalls, LocalCalls
from training import NAMESPACE
from training.data.features import ENGAGEMENTS, time_ms

STORE_NAME = "recsys-online-store"
MAX_RECENT = 50  # engagements kept per user: the towers read the last 20, the rest is headroom for later models


class RecentActions:
    """Recent engagements (item, action, unix seconds) and latest purchase time per item, per user."""

    def __init__(self, max_recent: int = MAX_RECENT) -> None:
        self.max_recent = max_recent
        self._recent: dict[str, deque[tuple[str, str, float]]] = {}
        self._bought: dict[str, dict[str, float]] = {}

    def append(self, events: Iterable[dict[str, Any]]) -> int:
        """Adds events ({user_id, item_id, action, ts} with ts in unix seconds); views are counted but not kept."""
        n = 0
        for e in events:
            n += 1
            if e["action"] not in ENGAGEMENTS:
                continue
            user = e["user_id"]
            q = self._recent.setdefault(user, deque(maxlen=self.max_recent))
            q.append((e["item_id"], e["action"], float(e["ts"])))
            if e["action"] == "purchase":
                bought = self._bought.setdefault(user, {})
                bought[e["item_id"]] = max(float(e["ts"]), bought.get(e["item_id"], 0.0))
        return n

    def get(self, user_id: str) -> dict[str, Any]:
        """The user's state, oldest engagement first; empty lists for an unknown user."""
        recent = sorted(self._recent.get(user_id, ()), key=lambda r: r[2])
        return {"items": [r[0] for r in recent], "actions": [r[1] for r in recent],
                "timestamps": [r[2] for r in recent], "bought_at": dict(self._bought.get(user_id, {}))}

    def load_events(self, events: pa.Table) -> int:
        """Bulk-loads an event log (EVENTS_SCHEMA), e.g. the shop's history when serving starts."""
        ts = time_ms(events.column("timestamp")) / 1000.0
        order = np.argsort(ts, kind="stable")
        cols = {c: np.asarray(events.column(c).to_pylist(), dtype=object)[order]
                for c in ("user_id", "item_id", "action")}
        return self.append({"user_id": u, "item_id": i, "action": a, "ts": t}
                           for u, i, a, t in zip(cols["user_id"], cols["item_id"], cols["action"], ts[order]))

    def stats(self) -> dict[str, int]:
        return {"users": len(self._recent), "engagements": sum(len(q) for q in self._recent.values())}


class StoreClient(Protocol):
    """What the ingress needs of the online store."""

    async def get(self, user_id: str) -> dict[str, Any]: ...

    async def append(self, events: list[dict[str, Any]]) -> int: ...

    async def stats(self) -> dict[str, int]: ...


def actor_store(name: str = STORE_NAME) -> StoreClient:
    """The cluster's store actor, reached by name."""
    return ActorCalls(ray.get_actor(name, namespace=NAMESPACE))


def local_store(state: RecentActions | None = None) -> StoreClient:
    """A `RecentActions` in this process: the store of Serve's local testing mode."""
    return LocalCalls(state or RecentActions())


def create_store(events: pa.Table | None = None, cpus: float = 0.05) -> ray.actor.ActorHandle:
    """The named store actor, created on first use and optionally seeded with an event log."""
    store = ray.remote(RecentActions).options(name=STORE_NAME, namespace=NAMESPACE, lifetime="detached",
                                              get_if_exists=True, num_cpus=cpus).remote()
    if events is not None:
        ray.get(store.load_events.remote(events))
    return store
