"""The rollout's thresholds, the validation gate a candidate passes before it takes traffic, and the live guards
that halt a shift. Plain Python: the controller gathers the figures, these functions judge them."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

from deployments.rollout.figures import percentile

STAGES = ("features", "retrieval", "ranking", "policy", "total")


@dataclass(frozen=True)
class RolloutConfig:
    # The gate: replayed requests (recorded events' users and contexts, topped up with the shop's users) answered by
    # blue and by the candidate, one after the other, through the same stages as live traffic.
    gate_requests: int = 100
    gate_k: int = 10  # the answer length compared (overlap@k, rank correlation)
    gate_max_error_rate: float = 0.0
    gate_max_empty_share: float = 0.0
    # p99 budgets per stage (ms) of the replayed requests; generous for a 2-core machine, tighten on real hardware
    gate_p99_budget_ms: dict[str, float] = field(default_factory=lambda: {"retrieval": 250.0, "ranking": 250.0,
                                                                          "total": 600.0})
    # offline metrics of the bundle (training's held-out evaluation): the candidate may be at most this much worse
    gate_offline_margin: float = 0.02
    gate_min_overlap: float = 0.0  # the least mean overlap@k with blue's answers (0: reported, never refused)
    # Live guards while shifting, over the candidate's requests since the step began (judged from guard_min_requests)
    guard_max_error_rate: float = 0.01
    guard_max_p99_ms: float = 1000.0
    guard_max_empty_share: float = 0.05
    guard_min_requests: int = 20
    retire_grace_s: float = 5.0  # after a version leaves the routing, requests that had chosen it finish

    def __post_init__(self) -> None:
        unknown = set(self.gate_p99_budget_ms) - set(STAGES)
        if unknown:
            raise ValueError(f"rollout.gate_p99_budget_ms: unknown stages {sorted(unknown)}; stages: {list(STAGES)}")
        if self.gate_requests < 1 or self.gate_k < 1:
            raise ValueError("rollout.gate_requests and rollout.gate_k: positive integers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def offline_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The bundle metrics the gate compares: the served retrieval model's recall@100 and NDCG@10 on held-out
    interactions, and the ranker's purchase AUC."""
    out = {}
    model = metrics.get("retrieval_model")
    retrieval = metrics.get("retrieval", {}).get(model, {})
    for key in ("recall@100", "ndcg@10"):
        if key in retrieval:
            out[f"retrieval {key}"] = float(retrieval[key])
    auc = metrics.get("ranking", {}).get("purchase", {}).get("auc")
    if auc is not None:
        out["ranking purchase auc"] = float(auc)
    return out


def order_flags(metrics: Mapping[str, Any]) -> list[str]:
    """What the gate reports without refusing: a ranker that orders retrieval's candidates worse than retrieval does
    on the held-out users (training's `serving_order`). Such a version serves retrieval's order or the two orders'
    fusion, whichever did better, so it is flagged, not stopped."""
    order = metrics.get("serving_order") or {}
    ranker, retrieval = order.get("ranker_ndcg@10"), order.get("retrieval_ndcg@10")
    loses = ranker < retrieval if ranker is not None and retrieval is not None else order.get("serve") == "retrieval"
    if not loses:
        return []
    nan = float("nan")
    return [f"ranker loses to retrieval's own order offline (NDCG@10 {nan if ranker is None else ranker:.4f} "
            f"against {nan if retrieval is None else retrieval:.4f}): the version serves "
            f"{order.get('serve', 'retrieval')}'s order"]


def _check(name: str, value: Any, threshold: Any, passed: bool, detail: str = "") -> dict[str, Any]:
    return {"check": name, "value": value, "threshold": threshold, "passed": bool(passed), "detail": detail}


def evaluate_gate(cfg: RolloutConfig, health: dict[str, Any], replay: Mapping[str, Any],
                  offline_blue: Mapping[str, float], offline_green: Mapping[str, float]) -> dict[str, Any]:
    """Every check with its value, threshold and outcome; passed only if all pass.

    health: {"ok": bool, "detail": str}. replay: {"blue": version, "requests": n, per version {"errors", "empty",
    "timings": {stage: [ms...]}}, "overlap": [...], "tau": [...]} (see `RolloutController._replay`).
    """
    checks = [_check("health of every stage", health["ok"], True, health["ok"], health.get("detail", ""))]
    n = replay["requests"]
    green = replay["green"]
    checks.append(_check("replay error rate", green["errors"] / n if n else 1.0, cfg.gate_max_error_rate,
                         n > 0 and green["errors"] / n <= cfg.gate_max_error_rate, f"{green['errors']} of {n}"))
    answered = n - green["errors"]
    empty_share = green["empty"] / answered if answered else 1.0
    checks.append(_check("replay empty answers", empty_share, cfg.gate_max_empty_share,
                         answered > 0 and empty_share <= cfg.gate_max_empty_share))
    for stage, budget in cfg.gate_p99_budget_ms.items():
        p99 = percentile(green["timings"].get(stage, []), 99)
        checks.append(_check(f"replay p99 {stage} (ms)", p99, budget, p99 is not None and p99 <= budget,
                             f"blue {percentile(replay['blue_figures']['timings'].get(stage, []), 99)}"))
    for name, blue_value in offline_blue.items():
        value = offline_green.get(name)
        floor = blue_value - cfg.gate_offline_margin
        checks.append(_check(f"offline {name}", value, round(floor, 6), value is not None and value >= floor,
                             f"blue {blue_value:.4f}, margin {cfg.gate_offline_margin}"))
    overlaps, taus = replay["overlap"], [t for t in replay["tau"] if t is not None]
    mean_overlap = sum(overlaps) / len(overlaps) if overlaps else None
    checks.append(_check(f"answer overlap@{cfg.gate_k} with blue", mean_overlap, cfg.gate_min_overlap,
                         mean_overlap is not None and mean_overlap >= cfg.gate_min_overlap,
                         f"rank correlation (Kendall tau on shared items) "
                         f"{sum(taus) / len(taus):.3f}" if taus else "no shared items to correlate"))
    return {"passed": all(c["passed"] for c in checks), "checks": checks,
            "diff": {"overlap_at_k": mean_overlap, "rank_correlation": sum(taus) / len(taus) if taus else None,
                     "k": cfg.gate_k, "requests": n}}


def tripped_guard(cfg: RolloutConfig, figures: Mapping[str, Any] | None) -> str | None:
    """Why the candidate's live figures halt the shift (error rate, p99, empty answers, a mixed answer), or None.
    Ratios are judged from `guard_min_requests` requests on; a mixed answer trips at once."""
    if not figures:
        return None
    if figures.get("mixed"):
        return f"{figures['mixed']} answers mixed versions"
    if figures["requests"] < cfg.guard_min_requests:
        return None
    if figures["error_rate"] > cfg.guard_max_error_rate:
        return f"error rate {figures['error_rate']:.3f} > {cfg.guard_max_error_rate}"
    if figures["p99_ms"] is not None and figures["p99_ms"] > cfg.guard_max_p99_ms:
        return f"p99 {figures['p99_ms']:.0f} ms > {cfg.guard_max_p99_ms:.0f} ms"
    if figures["empty_share"] > cfg.guard_max_empty_share:
        return f"empty answers {figures['empty_share']:.3f} > {cfg.guard_max_empty_share}"
    return None
