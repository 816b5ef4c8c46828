"""A live version's side of the change feed: read the log after the offset applied, change the forward index,
embed what changed with the version's own item tower, and say what each index shard must add and remove.

Every stage replica follows the log on its own (`deployments.retrieval`, `deployments.ranking`), from offset 0 on
top of the bundle's catalog, so a replica that starts or restarts comes back with every change (the log is the
catalog's history since the shop's snapshot; compacting it into a rebuilt index is not done yet). Shards change in
the same order everywhere: in process they are this replica's own; an index shard actor, which several replicas
reach, takes a change set only once, at the offset that follows its own (`indexing.embed.ShardActor.apply`).
Plain Python; nothing here imports Ray.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from indexing.changes import ChangeLog
from training.data.changes import ItemChange
from indexing.shards import shard_of
from training.request.forward import ForwardIndex

POLL_S = 0.5  # a replica reads the log this often: a change reaches answers within about a second
BATCH = 10_000  # changes applied at once


@dataclass
class ShardChanges:
    """What one shard at any offset from `after` up must do to reach `offset`: add (or replace) these vectors, remove
    these ids. They hold each item's state at `offset`, so applying them over part of the same changes is safe."""

    after: int
    offset: int
    ids: np.ndarray  # (n,) int64
    vectors: np.ndarray  # (n, D) float32
    removed: np.ndarray  # (m,) int64


@dataclass
class Follower:
    """Follows `log` into a forward index; with `embed` (ids -> vectors), also into `n_shards` index shards.

    `poll` reads and applies one batch and returns the shard changes (empty when the stage keeps no vectors).
    `touched` keeps, per offset applied, the items a change touched, so a shard that restarted from its saved file
    (and so from an older offset) is brought up to date from the current attributes (`catch_up`).
    """

    log: ChangeLog
    forward: ForwardIndex
    embed: object | None = None  # Callable[[np.ndarray], np.ndarray] | None
    n_shards: int = 0
    on_update: object | None = None  # Callable[[ForwardUpdate], None]: e.g. the retrieval core's own arrays
    offset: int = 0
    applied: int = 0
    skipped: list[str] = field(default_factory=list)
    touched: list[tuple[int, np.ndarray]] = field(default_factory=list)

    def poll(self, limit: int = BATCH) -> list[ShardChanges]:
        """Reads the next batch and applies it."""
        return self.apply(self.log.read(self.offset, limit))

    def apply(self, entries: list[tuple[int, ItemChange]]) -> list[ShardChanges]:
        """Applies entries read after `offset` (a caller may read in another thread and apply where requests
        run); returns what each shard must change (empty when the stage keeps no vectors)."""
        if not entries:
            return []
        if entries[0][0] <= self.offset:  # read before an earlier batch was applied
            entries = [e for e in entries if e[0] > self.offset]
            if not entries:
                return []
        update = self.forward.apply([c for _, c in entries])
        after, self.offset = self.offset, entries[-1][0]
        self.applied += len(entries)
        self.skipped = (self.skipped + list(update.skipped))[-20:]
        if self.on_update is not None:
            self.on_update(update)
        if self.embed is None or self.n_shards == 0:
            return []
        changed = np.union1d(update.embed, update.deleted)
        self.touched.append((self.offset, changed))
        return self._split(after, update.embed, update.deleted)

    def catch_up(self, shard_offset: int, shard: int) -> ShardChanges | None:
        """The changes that bring shard `shard`, at `shard_offset`, to this follower's offset (None: it is there)."""
        if shard_offset >= self.offset:
            return None
        changed = [ids for off, ids in self.touched if off > shard_offset]
        ids = np.unique(np.concatenate(changed)) if changed else np.zeros(0, np.int64)
        ids = ids[shard_of(ids, self.n_shards) == shard]
        gone = self.forward.deleted[ids]
        return self._split(shard_offset, ids[~gone], ids[gone])[shard]

    def _split(self, after: int, embed: np.ndarray, deleted: np.ndarray) -> list[ShardChanges]:
        vectors = self.embed(embed) if len(embed) else None
        out = []
        for s in range(self.n_shards):
            mine = shard_of(embed, self.n_shards) == s
            out.append(ShardChanges(after, self.offset, embed[mine],
                                    vectors[mine] if vectors is not None else np.zeros((0, 0), np.float32),
                                    deleted[shard_of(deleted, self.n_shards) == s]))
        return out

    def stats(self) -> dict:
        return {"offset": self.offset, "applied": self.applied, "skipped": list(self.skipped),
                "items": int(self.forward.live().sum())}
