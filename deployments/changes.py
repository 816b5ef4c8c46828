"""A stage replica follows the catalog's change log (`indexing.live.Follower`) on its own event loop: the log is read
in a worker thread, applied on the loop between requests (which read the same arrays), and the shard changes are
sent to the version's index shards, in process or on the shard actors. The lag behind the log is a metric."""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Sequence

from ray.serve import metrics

from indexing.live import POLL_S, Follower

logger = logging.getLogger("ray.serve")


class ChangeFollowing:
    """Runs one replica's `Follower`; `shards` are the version's index shards as coroutines (`deployments.calls`),
    or none for a stage that keeps no vectors (ranking)."""

    def __init__(self, follower: Follower, shards: Sequence[Any], version: str, stage: str) -> None:
        self.follower, self.shards, self.version, self.stage = follower, list(shards), version, stage
        self.end = 0  # the log's newest offset at the last poll
        self.errors = 0
        self.last_error = ""
        self._task: asyncio.Task | None = None
        self.lag = metrics.Gauge("recsys_change_log_lag", "Catalog changes logged but not yet applied by a replica.",
                                 tag_keys=("model_version", "stage"))

    def ensure_started(self) -> None:
        """Starts following on the running loop (once; again if the task died)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception as e:  # noqa: BLE001 - a bad log or a shard down: say so, keep serving, try again
                self.errors += 1
                if str(e) != self.last_error:
                    logger.warning(f"{self.version} {self.stage}: applying catalog changes failed: {e!r}")
                self.last_error = str(e)
            await asyncio.sleep(POLL_S)

    async def poll_once(self) -> int:
        """Reads, applies and sends one batch of changes; returns how many were applied."""
        f = self.follower
        entries, self.end = await asyncio.to_thread(lambda: (f.log.read(f.offset), f.log.end()))
        before = f.applied
        parts = f.apply(entries)
        for s, (shard, part) in enumerate(zip(self.shards, parts)):
            taken, at = await shard.apply_changes(part)
            if not taken:  # the shard restarted from its saved file: bring it up from its own offset
                catch_up = f.catch_up(at, s)
                if catch_up is not None:
                    await shard.apply_changes(catch_up)
        self.lag.set(max(self.end - f.offset, 0), {"model_version": self.version, "stage": self.stage})
        return f.applied - before

    async def check_shards(self) -> None:
        """Brings every shard that fell behind (a restarted shard actor) up to this replica's offset."""
        for s, shard in enumerate(self.shards):
            stats = await shard.stats()
            catch_up = self.follower.catch_up(stats.get("changes_offset", 0), s)
            if catch_up is not None:
                await shard.apply_changes(catch_up)

    def stats(self) -> dict[str, Any]:
        return {**self.follower.stats(), "log_end": self.end, "lag": max(self.end - self.follower.offset, 0),
                "errors": self.errors, "last_error": self.last_error}
