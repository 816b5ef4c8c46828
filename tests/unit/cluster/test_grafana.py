"""The Grafana dashboard reads only metrics the code exports (Ray's `ray_` prefix, histogram and counter suffixes)
or Serve's own, and every panel is a Prometheus query."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "cluster" / "grafana" / "recsys-dashboard.json"


def exported_metric_names() -> set[str]:
    """Names passed to ray.serve.metrics Counter/Histogram/Gauge in the project's code."""
    names = set()
    for path in (ROOT / "deployments").rglob("*.py"):
        names |= set(re.findall(r'metrics\.(?:Counter|Histogram|Gauge)\(\s*"([a-z_]+)"', path.read_text()))
    return names


def test_every_dashboard_query_reads_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metric_names()
    assert {"recsys_stage_ms", "recsys_requests", "recsys_shadow_overlap", "recsys_index_items",
            "recsys_query_cache_lookups", "recsys_change_log_lag"} <= exported
    used = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            used |= set(re.findall(r"\bray_(recsys_[a-z_]+?)(?:_bucket|_sum|_count|_total)?\b", target["expr"]))
    assert used and used <= exported, used - exported
    assert {p["gridPos"]["y"] for p in dashboard["panels"]}  # laid out
