"""The catalog's change feed: new items, attribute changes and deletions, in one durable order that every live
version applies to its forward index and its vectors without a rebuild (`indexing.live`).

A change is model-free (the item and its attributes); each version embeds it with its own item tower. Offsets are
1, 2, 3, ... in the order the log accepted the changes, so a replica that has applied offset n reads from n + 1 and
any number of writers (ingress replicas behind `POST /admin/items`, `recsys items apply`) agree on one order:
- `FileChangeLog`, the embedded default: an append-only JSON-lines file, appended under an exclusive lock and
  fsynced before the offset is returned (an acknowledged change survives a crash);
- `RedisChangeLog`, when Redis runs: a Redis stream whose entry ids are the offsets, appended by one Lua script so
  concurrent writers cannot interleave a counter and an entry (Redis's append-only file makes it durable).
Plain Python; nothing here imports Ray.
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

from training.data.changes import ItemChange

MAX_CHANGES = 10_000  # changes in one append (one POST /admin/items, one batch of `recsys items apply`)
STREAM = "recsys:items:changes"


class ChangeLog(Protocol):
    def append(self, changes: Iterable[ItemChange]) -> int:
        """Appends in order; returns the offset of the last one (durable when it returns)."""

    def read(self, after: int, limit: int = MAX_CHANGES) -> list[tuple[int, ItemChange]]:
        """The changes with offsets after `after`, oldest first, at most `limit`."""

    def end(self) -> int:
        """The offset of the newest change (0: none yet)."""


def _checked(changes: Iterable[ItemChange]) -> list[ItemChange]:
    """The changes to append, each upsert stamped with its creation time when it has none, so that every replica
    that replays the log later sees the same item age."""
    out = list(changes)
    if not all(isinstance(c, ItemChange) for c in out):
        raise TypeError("changes must be ItemChange objects")
    if len(out) > MAX_CHANGES:
        raise ValueError(f"at most {MAX_CHANGES} changes in one append, got {len(out)}")
    now = time.time()
    return [dataclasses.replace(c, created_at=now) if c.op == "upsert" and c.created_at is None else c for c in out]


class FileChangeLog:
    """An append-only JSON-lines file, one `{"offset": n, "change": {...}}` a line."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._cursor = (0, 0)  # (offset, byte position after it) of the last read: the next read seeks there

    def append(self, changes: Iterable[ItemChange]) -> int:
        changes = _checked(changes)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # writers in other processes append one after the other
            try:
                size = f.seek(0, os.SEEK_END)
                last, complete = _tail(f, size)
                if complete < size:  # a line cut short by a crash (never acknowledged): cut off
                    f.truncate(complete)
                lines = [json.dumps({"offset": last + i + 1, "change": c.to_dict()}, separators=(",", ":"))
                         for i, c in enumerate(changes)]
                if lines:
                    f.write(("\n".join(lines) + "\n").encode())
                    f.flush()
                    os.fsync(f.fileno())
                return last + len(lines)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self, after: int, limit: int = MAX_CHANGES) -> list[tuple[int, ItemChange]]:
        if not self.path.is_file():
            return []
        offset, position = self._cursor if self._cursor[0] <= after else (0, 0)
        out: list[tuple[int, ItemChange]] = []
        with open(self.path, "rb") as f:
            f.seek(position)
            for line in iter(f.readline, b""):
                if not line.endswith(b"\n"):  # still being written: read it next time
                    break
                try:
                    entry = json.loads(line)
                    offset, change = entry["offset"], ItemChange.from_dict(entry["change"])
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"change log {self.path}: the line after offset {offset} is corrupt: {e}") from e
                position += len(line)
                self._cursor = (offset, position)
                if offset > after:
                    out.append((offset, change))
                    if len(out) >= limit:
                        break
        return out

    def end(self) -> int:
        if not self.path.is_file():
            return 0
        with open(self.path, "rb") as f:
            return _tail(f, f.seek(0, os.SEEK_END))[0]


def _tail(f: Any, size: int) -> tuple[int, int]:
    """(offset of the file's last complete line, bytes up to its end), reading blocks back from the end."""
    block = 4096
    while True:
        start = max(0, size - block)
        f.seek(start)
        tail = f.read(size - start)
        end = tail.rfind(b"\n")
        if end >= 0:
            prev = tail.rfind(b"\n", 0, end)
            if prev >= 0 or start == 0:
                return json.loads(tail[prev + 1:end])["offset"], start + end + 1
        elif start == 0:
            return 0, 0
        block *= 2


# Takes the next offset and adds the entry under it in one step: writers never interleave the two.
_APPEND = """
local n = tonumber(redis.call('GET', KEYS[2]) or '0')
for i, change in ipairs(ARGV) do
  redis.call('XADD', KEYS[1], (n + i) .. '-0', 'c', change)
end
redis.call('SET', KEYS[2], n + #ARGV)
return n + #ARGV
"""


class RedisChangeLog:
    """A Redis stream whose entry ids are `<offset>-0`."""

    def __init__(self, url: str, stream: str = STREAM) -> None:
        self.url, self.stream = url, stream
        self._client: Any = None

    def _redis(self) -> Any:
        if self._client is None:
            import redis  # only where Redis runs

            self._client = redis.Redis.from_url(self.url, socket_timeout=5.0)
            self._script = self._client.register_script(_APPEND)
        return self._client

    def append(self, changes: Iterable[ItemChange]) -> int:
        changes = _checked(changes)
        client = self._redis()
        if not changes:
            return self.end()
        payload = [json.dumps(c.to_dict(), separators=(",", ":")) for c in changes]
        return int(self._script(keys=[self.stream, f"{self.stream}:offset"], args=payload, client=client))

    def read(self, after: int, limit: int = MAX_CHANGES) -> list[tuple[int, ItemChange]]:
        entries = self._redis().xrange(self.stream, min=f"{after + 1}-0", count=limit)
        return [(int(eid.split(b"-")[0]), ItemChange.from_dict(json.loads(fields[b"c"]))) for eid, fields in entries]

    def end(self) -> int:
        return int(self._redis().get(f"{self.stream}:offset") or 0)


def open_change_log(spec: str) -> ChangeLog:
    """A redis:// URL -> `RedisChangeLog`; anything else is the path of a `FileChangeLog`."""
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisChangeLog(spec)
    return FileChangeLog(spec)
