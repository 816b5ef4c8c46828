"""The serving clock (training/request/clock.py): a snapshot's versions run on their data's time line."""
from __future__ import annotations

import pytest

from training.request.clock import SNAPSHOT_AFTER_S, WALL, ServingClock, parse_iso, version_clock

END = "2026-10-01T00:00:00Z"


def _manifest(created_at: str | None = "2026-12-01T00:00:00Z", data_end: str | None = END) -> dict:
    return {"version": "v1", "created_at": created_at, "metrics": {"data_end_time": data_end} if data_end else {}}


def test_a_version_trained_on_a_snapshot_runs_on_its_data_time_line():
    clock = version_clock(_manifest(), "auto")
    assert clock.source == "data"
    trained = parse_iso("2026-12-01T00:00:00Z")
    assert clock.now(wall_s=trained) == parse_iso(END)  # at training time the clock reads the data's last instant
    assert clock.now(wall_s=trained + 3600) == parse_iso(END) + 3600  # and moves on at wall speed
    assert version_clock(_manifest(), "data") == clock


def test_live_data_and_old_bundles_run_on_the_wall_clock():
    fresh = _manifest(created_at="2026-10-01T12:00:00Z")  # trained half a day after its data ended: a live feed
    assert version_clock(fresh, "auto") is WALL
    assert version_clock(_manifest(), "wall") is WALL
    assert version_clock(_manifest(data_end=None), "auto") is WALL  # written before bundles recorded the data's end
    assert WALL.now(wall_s=123.0) == 123.0
    assert parse_iso(END) + SNAPSHOT_AFTER_S < parse_iso("2026-12-01T00:00:00Z")


def test_a_data_clock_without_the_data_end_and_an_unknown_mode_are_errors():
    with pytest.raises(ValueError, match="data_end_time"):
        version_clock(_manifest(data_end=None), "data")
    with pytest.raises(ValueError, match="serving.clock must be one of"):
        version_clock(_manifest(), "utc")


def test_the_clock_round_trips_and_naive_times_are_utc():
    clock = ServingClock(offset_s=-86400.0, source="data")
    assert ServingClock.from_dict(clock.to_dict()) == clock and ServingClock.from_dict(None) == WALL
    assert parse_iso("2026-10-01T00:00:00") == parse_iso(END) == parse_iso("2026-10-01T02:00:00+02:00")
