"""The ingress's online metrics (Ray Serve custom metrics, exported by Ray in Prometheus format on each node's
metrics export port, with Serve's deployment/replica/application tags added): per served model version and
surface, the number of answers, histograms of unique brands, longest same-brand run and share of new items in the
answered items, a counter of answered items per policy rule that placed or moved them, and the policy's latency."""
from __future__ import annotations

from typing import Any, Mapping

from ray.serve import metrics

from training.request.contracts import RankedList
from training.request.policy import is_new_item, longest_brand_run


def answer_figures(final: RankedList, k: int, now: float, new_item_days: float) -> dict[str, Any]:
    """Diversity and novelty of the k answered items: unique brands, longest brand run, share of new items, and
    the count of items per policy rule (the "policy:<rule>" reasons)."""
    top = final.take(range(min(k, len(final))))
    new = is_new_item(top.created_at, now, new_item_days)
    rules: dict[str, int] = {}
    for r in top.reasons:
        if r.startswith("policy:"):
            rules[r[7:]] = rules.get(r[7:], 0) + 1
    return {"unique_brands": len(set(top.brands)), "longest_brand_run": longest_brand_run(top.brands),
            "novelty": float(new.mean()) if new is not None and len(top) else 0.0, "rules": rules}


class PolicyMetrics:
    """The ingress's Ray Serve custom metrics, tagged by model version and surface (a bounded set: see
    `deployments.ingress.admin.PolicySteering.surface`)."""

    TAGS = ("model_version", "surface")

    def __init__(self) -> None:
        self.answers = metrics.Counter("recsys_policy_answers", "Answers served.", tag_keys=self.TAGS)
        self.unique_brands = metrics.Histogram("recsys_policy_unique_brands", "Unique brands among answered items.",
                                               boundaries=[1, 2, 3, 5, 8, 10, 15, 20, 50], tag_keys=self.TAGS)
        self.brand_run = metrics.Histogram("recsys_policy_longest_brand_run", "Longest same-brand run answered.",
                                           boundaries=[1, 2, 3, 4, 6, 10], tag_keys=self.TAGS)
        self.novelty = metrics.Histogram("recsys_policy_novelty", "Share of new items among answered items.",
                                         boundaries=[0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0], tag_keys=self.TAGS)
        self.rule_items = metrics.Counter("recsys_policy_rule_items", "Answered items a policy rule placed or moved.",
                                          tag_keys=(*self.TAGS, "rule"))
        self.latency = metrics.Histogram("recsys_policy_ms", "Policy stage milliseconds.",
                                         boundaries=[0.1, 0.25, 0.5, 1, 2, 5, 10], tag_keys=self.TAGS)

    def record(self, version: str, surface: str, figures: Mapping[str, Any], policy_ms: float) -> None:
        tags = {"model_version": version, "surface": surface}
        self.answers.inc(1, tags)
        self.unique_brands.observe(figures["unique_brands"], tags)
        self.brand_run.observe(figures["longest_brand_run"], tags)
        self.novelty.observe(figures["novelty"], tags)
        self.latency.observe(policy_ms, tags)
        for rule, n in figures["rules"].items():
            self.rule_items.inc(n, {**tags, "rule": rule})


STAGE_MS_BOUNDARIES = [1, 2, 5, 10, 20, 35, 50, 75, 100, 150, 250, 500, 1000, 2500]


class RequestMetrics:
    """Per served version: stage latency histograms (features, retrieval, ranking, policy, total), answers, and the
    shadow version's latency and overlap with what was served."""

    def __init__(self) -> None:
        self.stage_ms = metrics.Histogram("recsys_stage_ms", "Milliseconds per request stage.",
                                          boundaries=STAGE_MS_BOUNDARIES, tag_keys=("model_version", "stage"))
        self.requests = metrics.Counter("recsys_requests", "Answers served per version.", tag_keys=("model_version",))
        self.shadow_ms = metrics.Histogram("recsys_shadow_ms", "Milliseconds of a shadow answer.",
                                           boundaries=STAGE_MS_BOUNDARIES, tag_keys=("model_version",))
        self.shadow_overlap = metrics.Histogram("recsys_shadow_overlap", "Overlap@k of a shadow answer with the "
                                                "served one.", boundaries=[0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0],
                                                tag_keys=("model_version",))

    def record(self, version: str, timings_ms: Mapping[str, float]) -> None:
        self.requests.inc(1, {"model_version": version})
        for stage, ms in timings_ms.items():
            self.stage_ms.observe(ms, {"model_version": version, "stage": stage})

    def record_shadow(self, version: str, ms: float, overlap: float) -> None:
        tags = {"model_version": version}
        self.shadow_ms.observe(ms, tags)
        self.shadow_overlap.observe(overlap, tags)
