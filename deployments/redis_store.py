"""The online store in Redis: the same state and interface as the embedded `RecentActions`, durable and shared by
every ingress replica.

Keys (prefix `recsys:`, one Redis database per deployment):

    u:<user>:recent   list   "item\\taction\\tts", the last MAX_RECENT engagements in arrival order
    u:<user>:bought   hash   item -> latest purchase time
    u:<user>:views    list   "item\\tts", the last MAX_VIEWS views; u:<user>:nviews counts all of them
    users             set    users with at least one engagement
    stats             hash   events, views, engagements (kept)
    events            stream every posted event with position and context (capped near MAX_LOG * 10)
    seeded            string the snapshot id of the shop history loaded, so a restart does not load it twice

A batch of events is one server-side script (atomic: a reader sees all of a batch or none of it), and `/events`
answers only after Redis acknowledged it; with `appendfsync always` (cluster/redis_server.py) that is after the
append-only file reached the disk. Ids cannot hold whitespace (the HTTP schema refuses it), so a tab separates
fields. The script names its keys itself, so this is for one Redis server, not Redis Cluster.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import pyarrow as pa

from deployments.store import MAX_LOG, MAX_RECENT, MAX_VIEWS, empty_state, shop_history

PREFIX = "recsys:"
SEED_BATCH = 5000  # events per script call when loading a shop's history

# KEYS: none (see the module docstring). ARGV: prefix, max_recent, max_views, max_log, log (1/0), then 6 per event:
# user, item, action, ts, position ("" when unknown), context (JSON, "" when none).
_APPEND = """
local p, max_recent, max_views, max_log, log = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local n, views, kept = 0, 0, 0
for i = 6, #ARGV, 6 do
  local user, item, action, ts = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local u = p .. 'u:' .. user
  if log == '1' then
    redis.call('XADD', p .. 'events', 'MAXLEN', '~', max_log, '*', 'user_id', user, 'item_id', item,
               'action', action, 'ts', ts, 'position', ARGV[i + 4], 'context', ARGV[i + 5])
  end
  if action == 'view' then
    views = views + 1
    redis.call('INCR', u .. ':nviews')
    redis.call('RPUSH', u .. ':views', item .. '\\t' .. ts)
    redis.call('LTRIM', u .. ':views', -max_views, -1)
  else
    if redis.call('RPUSH', u .. ':recent', item .. '\\t' .. action .. '\\t' .. ts) > max_recent then
      redis.call('LTRIM', u .. ':recent', -max_recent, -1)
    else
      kept = kept + 1
    end
    redis.call('SADD', p .. 'users', user)
    if action == 'purchase' then
      local cur = redis.call('HGET', u .. ':bought', item)
      if (not cur) or tonumber(cur) < tonumber(ts) then redis.call('HSET', u .. ':bought', item, ts) end
    end
  end
  n = n + 1
end
redis.call('HINCRBY', p .. 'stats', 'events', n)
redis.call('HINCRBY', p .. 'stats', 'views', views)
redis.call('HINCRBY', p .. 'stats', 'engagements', kept)
return n
"""


def _args(events: Iterable[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for e in events:
        pos, ctx = e.get("position"), e.get("context")
        out += [e["user_id"], e["item_id"], e["action"], repr(float(e["ts"])), "" if pos is None else str(int(pos)),
                "" if not ctx else json.dumps(ctx, separators=(",", ":"))]
    return out


class RedisActions:
    """`StoreClient` over Redis (redis-py's asyncio client). The connection pool is created on first use, inside the
    event loop of the replica that uses it, so the object itself pickles (Serve passes it as an init argument)."""

    def __init__(self, url: str, max_recent: int = MAX_RECENT, max_views: int = MAX_VIEWS,
                 max_log: int = MAX_LOG * 10, timeout_s: float = 2.0) -> None:
        self.url, self.max_recent, self.max_views, self.max_log = url, max_recent, max_views, max_log
        self.timeout_s = timeout_s
        self._redis: Any = None
        self._script: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_redis": None, "_script": None}

    def _client(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=self.timeout_s,
                                                  socket_connect_timeout=self.timeout_s, health_check_interval=30)
            self._script = self._redis.register_script(_APPEND)
        return self._redis

    async def _run(self, args: list[str], log: bool) -> int:
        client = self._client()
        head = [PREFIX, str(self.max_recent), str(self.max_views), str(self.max_log), "1" if log else "0"]
        return int(await self._script(keys=[], args=head + args, client=client))

    async def append(self, events: list[dict[str, Any]]) -> int:
        return await self._run(_args(events), log=True) if events else 0

    async def get(self, user_id: str) -> dict[str, Any]:
        u = f"{PREFIX}u:{user_id}"
        async with self._client().pipeline(transaction=False) as pipe:
            recent, bought, views = await pipe.lrange(f"{u}:recent", 0, -1).hgetall(f"{u}:bought").get(
                f"{u}:nviews").execute()
        if not recent and not bought and not views:
            return empty_state()
        rows = sorted((r.split("\t") for r in recent), key=lambda r: float(r[2]))
        return {"items": [r[0] for r in rows], "actions": [r[1] for r in rows],
                "timestamps": [float(r[2]) for r in rows], "bought_at": {i: float(t) for i, t in bought.items()},
                "views": int(views or 0)}

    async def recent_views(self, user_id: str) -> list[tuple[str, float]]:
        rows = await self._client().lrange(f"{PREFIX}u:{user_id}:views", 0, -1)
        return [(i, float(t)) for i, t in (r.split("\t") for r in rows)]

    async def recent_log(self, n: int = 100) -> list[dict[str, Any]]:
        if n <= 0:
            return []
        rows = await self._client().xrevrange(f"{PREFIX}events", count=n)
        return [{"user_id": f["user_id"], "item_id": f["item_id"], "action": f["action"], "ts": float(f["ts"]),
                 "position": int(f["position"]) if f["position"] else None,
                 "context": json.loads(f["context"]) if f["context"] else None} for _, f in reversed(rows)]

    async def stats(self) -> dict[str, Any]:
        client = self._client()
        async with client.pipeline(transaction=False) as pipe:
            counts, users = await pipe.hgetall(f"{PREFIX}stats").scard(f"{PREFIX}users").execute()
        return {"backend": "redis", "durable": True, "users": int(users),
                "engagements": int(counts.get("engagements", 0)), "views": int(counts.get("views", 0)),
                "events": int(counts.get("events", 0))}

    async def seed(self, events: pa.Table, snapshot: str) -> bool:
        """Loads a shop's history once per snapshot: False (nothing loaded) when this database holds it already, so
        restarting the application keeps the events posted since."""
        client = self._client()
        seeded = await client.get(f"{PREFIX}seeded")
        if seeded == snapshot:
            return False
        if seeded is not None:
            raise ValueError(f"{self.url} holds the history of shop snapshot {seeded!r} (or a load that did not "
                             f"finish), not {snapshot!r}: serve it from another database or flush this one")
        await client.set(f"{PREFIX}seeded", f"loading {snapshot}")
        batch: list[dict[str, Any]] = []
        for e in shop_history(events):
            batch.append(e)
            if len(batch) == SEED_BATCH:
                await self._run(_args(batch), log=False)
                batch = []
        if batch:
            await self._run(_args(batch), log=False)
        await client.set(f"{PREFIX}seeded", snapshot)
        return True

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
