"""Per-version request figures: recorded by each ingress replica (`Outcomes`), reported to the rollout controller
once a second, aggregated over a time window (`aggregate`) for the live guards and `recsys rollout status`."""
from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from typing import Any

MAX_SAMPLES = 200  # latencies kept per version per report (a second): a uniform sample beyond it (reservoir)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100, nearest rank) of `values`; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100.0 * len(ordered)) - 1))])


class _Reservoir:
    def __init__(self, rng: random.Random) -> None:
        self.values: list[float] = []
        self.seen, self.rng = 0, rng

    def add(self, x: float) -> None:
        self.seen += 1
        if len(self.values) < MAX_SAMPLES:
            self.values.append(x)
        else:
            j = self.rng.randrange(self.seen)
            if j < MAX_SAMPLES:
                self.values[j] = x


class Outcomes:
    """What one ingress replica saw per version since its last report."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self._reset()

    def _reset(self) -> None:
        self.counts: dict[str, dict[str, int]] = {}
        self.latency: dict[str, _Reservoir] = {}
        self.shadow: dict[str, dict[str, Any]] = {}

    def record(self, version: str, latency_ms: float, error: bool = False, empty: bool = False,
               mixed: bool = False) -> None:
        c = self.counts.setdefault(version, {"requests": 0, "errors": 0, "empty": 0, "mixed": 0})
        c["requests"] += 1
        c["errors"] += int(error)
        c["empty"] += int(empty)
        c["mixed"] += int(mixed)
        if not error:
            self.latency.setdefault(version, _Reservoir(self.rng)).add(latency_ms)

    def record_shadow(self, version: str, latency_ms: float | None, overlap: float | None,
                      tau: float | None) -> None:
        """One shadow answer of `version`: its latency, and its overlap@k and rank correlation with the answer
        served; `latency_ms` None: the shadow call failed."""
        s = self.shadow.setdefault(version, {"requests": 0, "errors": 0, "overlap_sum": 0.0, "tau_sum": 0.0,
                                             "tau_n": 0, "latency": _Reservoir(self.rng)})
        s["requests"] += 1
        if latency_ms is None:
            s["errors"] += 1
            return
        s["latency"].add(latency_ms)
        s["overlap_sum"] += overlap or 0.0
        if tau is not None:
            s["tau_sum"], s["tau_n"] = s["tau_sum"] + tau, s["tau_n"] + 1

    def flush(self) -> dict[str, Any]:
        """The figures since the last flush, as plain data, and a fresh start; {} when nothing happened."""
        if not self.counts and not self.shadow:
            return {}
        out = {"versions": {v: {**c, "latency_ms": self.latency[v].values if v in self.latency else []}
                            for v, c in self.counts.items()},
               "shadow": {v: {**{k: x for k, x in s.items() if k != "latency"}, "latency_ms": s["latency"].values}
                          for v, s in self.shadow.items()}}
        self._reset()
        return out


def aggregate(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sums reports (of `Outcomes.flush`) into per-version figures: requests, errors, empty, mixed, their rates,
    p50/p99 latency; and per shadow version: requests, errors, mean overlap@k and rank correlation, p99."""
    versions: dict[str, dict[str, Any]] = {}
    shadow: dict[str, dict[str, Any]] = {}
    for snap in snapshots:
        for v, c in snap.get("versions", {}).items():
            a = versions.setdefault(v, {"requests": 0, "errors": 0, "empty": 0, "mixed": 0, "latency_ms": []})
            for key in ("requests", "errors", "empty", "mixed"):
                a[key] += c[key]
            a["latency_ms"] += c["latency_ms"]
        for v, s in snap.get("shadow", {}).items():
            a = shadow.setdefault(v, {"requests": 0, "errors": 0, "overlap_sum": 0.0, "tau_sum": 0.0, "tau_n": 0,
                                      "latency_ms": []})
            for key in ("requests", "errors", "overlap_sum", "tau_sum", "tau_n"):
                a[key] += s[key]
            a["latency_ms"] += s["latency_ms"]
    out_v = {}
    for v, a in versions.items():
        n = a["requests"]
        out_v[v] = {"requests": n, "errors": a["errors"], "empty": a["empty"], "mixed": a["mixed"],
                    "error_rate": a["errors"] / n if n else 0.0, "empty_share": a["empty"] / n if n else 0.0,
                    "p50_ms": percentile(a["latency_ms"], 50), "p99_ms": percentile(a["latency_ms"], 99)}
    out_s = {}
    for v, a in shadow.items():
        answered = a["requests"] - a["errors"]
        out_s[v] = {"requests": a["requests"], "errors": a["errors"],
                    "overlap_at_k": a["overlap_sum"] / answered if answered else None,
                    "rank_correlation": a["tau_sum"] / a["tau_n"] if a["tau_n"] else None,
                    "p99_ms": percentile(a["latency_ms"], 99)}
    return {"versions": out_v, "shadow": out_s}
