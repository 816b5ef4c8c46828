"""The one orchestrator of a request: the user's state from the online store, then the chosen version's retrieval
and ranking (by handle, each its own scaled deployment), then the policy in this process.

    ingress --actor call--> online store          user state (no deployment hop)
            --handle------> Retrieval[v] --> index shards of v (fan-out, merge)
            --handle------> Ranking[v]            (batched with concurrent requests)
            policy (in process)                   apply_policy on the ranked list
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from ray.serve.exceptions import BackPressureError

from deployments.ingress.routing import VersionStages
from deployments.store import StoreClient
from training.request.contracts import ItemFilter, RankedList, RankRequest, RetrievalRequest, UserState
from training.request.policy import apply_policy, request_rng
from training.request.policy_config import PolicyConfig

RANKED_PER_K = 4  # the policy sees 4k ranked items (at least 100), room to sort bought items down and diversify
MIN_RANKED = 100
STAGE_TIMEOUT_S = 5.0  # each stage call; far above a loaded stage's p99 (~0.2 s here), so only a stuck one trips it


class StageUnavailable(Exception):
    """A stage refused the request (its queue is full) or did not answer in time: the client should retry later."""

    def __init__(self, stage: str, reason: str, status_code: int = 503, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.status_code, self.retry_after_s = stage, status_code, retry_after_s


async def _call(stage: str, call: Awaitable, timeout_s: float) -> Any:
    """One stage call with a timeout; back-pressure and time-outs become `StageUnavailable`."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except BackPressureError as e:  # [1] the stage's max_queued_requests is full: shed at once, never queue
        raise StageUnavailable(stage, str(e), e.status_code, e.retry_after_s or 1.0) from e
    except asyncio.TimeoutError as e:
        raise StageUnavailable(stage, f"no answer within {timeout_s:.1f} s") from e


@dataclass(frozen=True)
class Answer:
    """The policy's final list for one request, with what the response and the metrics report about it."""

    final: RankedList
    cold_start: bool
    partial: bool  # an index shard did not answer: retrieval served the other shards' candidates
    now: float  # unix seconds the policy judged recency and novelty by
    timings_ms: dict[str, float]


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


async def answer(user_id: str, context: dict, k: int, stages: VersionStages, store: StoreClient,
                 policy: PolicyConfig, request_id: str, candidates: int,
                 item_filter: ItemFilter = ItemFilter(), timeout_s: float = STAGE_TIMEOUT_S) -> Answer:
    """Runs one request through the stages of its version.

    Args:
        context: the request context (country, device, page, category, query).
        policy: the request's policy (surface preset and overrides applied); its `sponsored_items` are ranked with
            the candidates so the policy can place them.
        candidates: how many items retrieval hands to ranking.
        item_filter: the request's filters, applied inside the index search.
        timeout_s: the limit of each stage call.
    Raises:
        StageUnavailable: a stage shed the request or did not answer within `timeout_s`.
    """
    t0 = time.perf_counter()
    state = await _call("online store", store.get(user_id), timeout_s)
    t1 = time.perf_counter()
    found = await _call("retrieval", stages.retrieval.retrieve.remote(
        RetrievalRequest(state, context, candidates, item_filter)), timeout_s)
    t2 = time.perf_counter()
    ranked = await _call("ranking", stages.ranking.rank.remote(
        RankRequest(found, max(RANKED_PER_K * k, MIN_RANKED), tuple(policy.sponsored_items))), timeout_s)
    t3 = time.perf_counter()
    now = time.time()
    rng = request_rng(request_id) if policy.explore_epsilon > 0 else None
    final = apply_policy(ranked, UserState(state["bought_at"], now), policy, rng)
    timings = {"features": (t1 - t0) * 1000.0, "retrieval": (t2 - t1) * 1000.0, "ranking": (t3 - t2) * 1000.0,
               "policy": _ms(t3)}
    return Answer(final, found.cold_start, found.partial, now, timings)
