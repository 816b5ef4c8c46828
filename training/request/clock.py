"""One clock for serving: the instant that item ages ("new item") and action ages are measured against.

A version learns from data that ended at some instant. Serving must measure ages on the same time line, or
nothing it learnt about time holds: the synthetic shop ends on a fixed day, and against the wall clock of a later
day none of its items is new (exploration has no pool) and every action of the history is older than any seen in
training. So the clock of a version is:

- "wall": the wall clock (live data: the events keep coming in, the data ends now);
- "data": the data's end instant when the version was trained, moving on at wall-clock speed from there
  (now = data_end + (wall - bundle created_at)), so every replica of the version reads the same time;
- "auto" (the default): "data" when the data ended more than `SNAPSHOT_AFTER_S` before the version was trained
  (a snapshot: the synthetic shop, a public data set), else "wall". A bundle that does not record its data's end
  (written before this clock existed) runs on the wall clock.

`ServingConfig.clock` sets the mode in one place; `version_clock` resolves it from a bundle's manifest, and every
stage and the ingress take their "now" from the result.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

CLOCKS = ("auto", "data", "wall")
SNAPSHOT_AFTER_S = 2 * 86_400.0  # data that ended two days before training is a snapshot, not a live feed


def parse_iso(value: str) -> float:
    """Unix seconds of an ISO-8601 instant ("Z" or an offset; naive means UTC)."""
    t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp()


@dataclass(frozen=True)
class ServingClock:
    """now() = wall clock + offset_s; `source` says which time line ("wall" or "data")."""

    offset_s: float = 0.0
    source: str = "wall"

    def now(self, wall_s: float | None = None) -> float:
        return (time.time() if wall_s is None else wall_s) + self.offset_s

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "ServingClock":
        return cls(**(d or {}))


WALL = ServingClock()


def version_clock(manifest: dict, mode: str = "auto") -> ServingClock:
    """The clock of a version from its bundle manifest (`created_at`, `metrics.data_end_time`) and the mode."""
    if mode not in CLOCKS:
        raise ValueError(f"serving.clock must be one of {list(CLOCKS)}, got {mode!r}")
    data_end = (manifest.get("metrics") or {}).get("data_end_time")
    if mode == "wall" or not data_end or not manifest.get("created_at"):
        if mode == "data" and not data_end:
            raise ValueError(f"serving.clock is 'data' but bundle {manifest.get('version')!r} does not record when "
                             "its data ends (metrics.data_end_time); retrain it or use 'wall'")
        return WALL
    end_s, trained_s = parse_iso(data_end), parse_iso(manifest["created_at"])
    if mode == "auto" and trained_s - end_s <= SNAPSHOT_AFTER_S:
        return WALL
    return ServingClock(offset_s=end_s - trained_s, source="data")
