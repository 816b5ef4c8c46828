"""Serving logic that needs no cluster: routing, the HTTP schemas, the online store, the CLI's errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from deployments.features import RecentActions
from deployments.ingress import choose_version, parse_weights
from deployments.schemas import EventsRequest, RecommendRequest


def test_routing_is_sticky_and_close_to_the_weights():
    weights = {"blue": 90.0, "green": 10.0}
    users = [f"user-{i}" for i in range(5000)]
    picks = [choose_version(u, weights) for u in users]
    assert picks == [choose_version(u, weights) for u in users]
    assert 0.08 < picks.count("green") / len(users) < 0.12


def test_a_zero_weight_version_gets_no_traffic_and_bad_weights_are_refused():
    assert {choose_version(f"u{i}", {"a": 0.0, "b": 1.0}) for i in range(200)} == {"b"}
    for bad in ({}, {"a": -1}, {"a": "x"}, {"a": 0, "b": 0}):
        with pytest.raises(ValueError):
            parse_weights(bad)


def test_recommend_request_bounds_k_and_refuses_unknown_fields():
    assert RecommendRequest(user_id="u1").k == 20
    for body in ({"user_id": "u1", "k": 0}, {"user_id": "u1", "k": 501}, {"user_id": "u1", "surprise": 1},
                 {"user_id": "has space"}):
        with pytest.raises(ValidationError):
            RecommendRequest(**body)
    with pytest.raises(ValidationError, match="action"):
        EventsRequest(events=[{"user_id": "u", "item_id": "i", "action": "steal"}])


def test_online_store_keeps_recent_engagements_in_time_order_and_purchases():
    store = RecentActions(max_recent=3)
    n = store.append([{"user_id": "u", "item_id": f"i{k}", "action": "click", "ts": float(10 - k)} for k in range(5)]
                     + [{"user_id": "u", "item_id": "i9", "action": "view", "ts": 20.0},
                        {"user_id": "u", "item_id": "i7", "action": "purchase", "ts": 30.0}])
    assert n == 7
    state = store.get("u")
    assert state["items"] == ["i4", "i3", "i7"]  # the 3 latest kept, oldest first; views not kept
    assert state["bought_at"] == {"i7": 30.0}
    assert store.get("nobody") == {"items": [], "actions": [], "timestamps": [], "bought_at": {}}


def test_cli_reports_a_bad_size_as_an_error_naming_it(tmp_path):
    done = subprocess.run([sys.executable, "-m", "cluster.cli", "generate", "--size", "huge", "--out",
                           str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "huge" in done.stderr and "Traceback" not in done.stderr
