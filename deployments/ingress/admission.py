"""Admission control of an ingress replica: how many requests it works on at once, adapted to the latency they get,
and an immediate 503 with Retry-After for the rest.

Why not Serve's queue alone. Serve bounds each replica's queue (`max_queued_requests`) and its proxy sheds beyond
it, but an admitted request still waits behind everything queued: on this 2-core machine the stages serve about
15-25 requests a second, so 96 admitted requests (2 ingress replicas x (16 ongoing + 32 queued)) waited 4-10 s
(measured: `recsys bench reliability`, 200 clients). And the proxy's own 503 carries no Retry-After. So the ingress
takes every request Serve hands it and admits only as many as the stages behind it serve at near-unloaded latency;
the rest are answered at once, before any stage call.

The limit (per replica) follows the latency of the requests it admitted, as the adaptive concurrency limiters of
Netflix's concurrency-limits and Envoy do: a baseline of the lowest recent latency, and per finished request the
limit grows by 1/limit when the request took less than `tolerance` x baseline, and shrinks by `backoff` when it took
longer. Plain Python, unit-tested without Serve.
"""
from __future__ import annotations

import math

MIN_LIMIT = 1
MAX_LIMIT = 32
TOLERANCE = 2.0  # a request slower than this many times the baseline means the stages are queueing
BACKOFF = 0.9
DRIFT = 0.002  # the baseline rises this fraction per sample, so it follows a slower machine or model
INGRESS_MAX_ONGOING = 4  # requests one ingress replica works on at once (Serve's cap, and the limit's ceiling)
INGRESS_MIN_ADMITTED = 2  # the limit's floor: two requests at once always get through, whatever the latency


class AdaptiveLimit:
    """How many requests one ingress replica works on at once."""

    def __init__(self, initial: float = 4.0, min_limit: int = MIN_LIMIT, max_limit: int = MAX_LIMIT,
                 tolerance: float = TOLERANCE, backoff: float = BACKOFF, drift: float = DRIFT) -> None:
        if not 1 <= min_limit <= initial <= max_limit:
            raise ValueError(f"admission: need 1 <= min_limit <= initial <= max_limit, got {min_limit}, {initial}, "
                             f"{max_limit}")
        self.limit, self.min_limit, self.max_limit = float(initial), min_limit, max_limit
        self.tolerance, self.backoff, self.drift = tolerance, backoff, drift
        self.inflight = 0
        self.baseline_s: float | None = None
        self.admitted = self.shed = 0

    def try_admit(self) -> bool:
        """True and counted in flight when under the limit; False (shed) otherwise."""
        if self.inflight >= math.floor(self.limit):
            self.shed += 1
            return False
        self.inflight += 1
        self.admitted += 1
        return True

    def done(self, latency_s: float) -> None:
        """An admitted request finished after `latency_s` (a failed one too: it held a slot)."""
        self.inflight -= 1
        if self.baseline_s is None or latency_s < self.baseline_s:
            self.baseline_s = latency_s
        else:
            self.baseline_s *= 1.0 + self.drift
        if latency_s > self.tolerance * self.baseline_s:
            self.limit = max(float(self.min_limit), self.limit * self.backoff)
        else:
            self.limit = min(float(self.max_limit), self.limit + 1.0 / self.limit)

    def stats(self) -> dict[str, float]:
        return {"limit": round(self.limit, 2), "inflight": self.inflight, "admitted": self.admitted,
                "shed": self.shed, "baseline_ms": round((self.baseline_s or 0.0) * 1000.0, 2)}
