"""The one orchestrator of a request: the user's state from the online store, then the chosen version's retrieval
and ranking (by handle, each its own scaled deployment), then the policy in this process.

Failures, and how each is answered:
- a stage whose queue is full sheds the request at once (`StageUnavailable`, 503/429 with Retry-After);
- a stage that does not answer within its timeout: `StageUnavailable`, 503;
- a replica that dies under the request: the call is retried once (Serve routes it to another replica);
- the online store down or slow: the request goes on with an empty user state (the request's context and popular
  items answer it) and says so (`store_fallback`), never a 5xx.

    ingress --actor call--> online store          user state (no deployment hop)
            --handle------> Retrieval[v] --> index shards of v (fan-out, merge)
            --handle------> Ranking[v]            (batched with concurrent requests)
            policy (in process)                   apply_policy on the ranked list
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError

from deployments.ingress.routing import VersionStages
from deployments.store import StoreClient, empty_state
from training.request.contracts import ItemFilter, RankedList, RankRequest, RetrievalRequest, UserState
from training.request.policy import SECONDS_PER_DAY, apply_policy, policy_rng
from training.request.policy_config import PolicyConfig

RANKED_PER_K = 4  # the policy sees 4k ranked items (at least 100), room to sort bought items down and diversify
MIN_RANKED = 100
STAGE_TIMEOUT_S = 5.0  # each stage call; far above a loaded stage's p99 (~0.2 s here), so only a stuck one trips it
STORE_TIMEOUT_S = 0.5  # the store answers in ~2 ms; past this the request goes on without the user's state
# The replica died (or is restarting) under the call; over gRPC (`routing.VersionStages`) Serve maps a lost
# connection to ActorUnavailableError, and any other transport error is taken the same way.
REPLICA_GONE = (RayActorError, ActorUnavailableError, grpc.aio.AioRpcError)
logger = logging.getLogger("ray.serve")


class StageUnavailable(Exception):
    """A stage refused the request (its queue is full) or did not answer in time: the client should retry later."""

    def __init__(self, stage: str, reason: str, status_code: int = 503, retry_after_s: float = 1.0) -> None:
        super().__init__(f"{stage}: {reason}")
        self.stage, self.status_code, self.retry_after_s = stage, status_code, retry_after_s


async def _call(stage: str, make_call: Callable[[], Awaitable], timeout_s: float, retries: int = 1) -> Any:
    """One stage call with a timeout, retried `retries` times when its replica died under it (the calls are
    idempotent); back-pressure, time-outs and a second death become `StageUnavailable`."""
    for attempt in range(retries + 1):
        try:
            return await asyncio.wait_for(make_call(), timeout_s)
        except BackPressureError as e:  # [1] the stage's max_queued_requests is full: shed at once, never queue
            raise StageUnavailable(stage, str(e), e.status_code, e.retry_after_s or 1.0) from e
        except asyncio.TimeoutError as e:
            raise StageUnavailable(stage, f"no answer within {timeout_s:.1f} s") from e
        except REPLICA_GONE as e:
            if attempt == retries:
                raise StageUnavailable(stage, f"replica gone: {type(e).__name__}") from e
            logger.warning(f"{stage}: replica gone under a request ({type(e).__name__}); retrying once")


class _Throttled:
    """Logs a recurring warning at most once per `every_s` (a dead store would otherwise log every request)."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s, self.last, self.suppressed = every_s, -float("inf"), 0

    def warn(self, msg: str) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            self.suppressed += 1
            return
        logger.warning(f"{msg} ({self.suppressed} more since the last warning)")
        self.last, self.suppressed = now, 0


_store_warning = _Throttled()


async def user_state(store: StoreClient, user_id: str, timeout_s: float) -> tuple[dict[str, Any], bool]:
    """The user's state and whether it is a fallback (an empty state, because the store failed or was slow)."""
    try:
        return await asyncio.wait_for(store.get(user_id), timeout_s), False
    except Exception as e:  # noqa: BLE001 - any store failure (actor gone, Redis down, timeout) degrades the same way
        _store_warning.warn(f"online store unavailable ({type(e).__name__}: {e}); answering without user state")
        return empty_state(), True


@dataclass(frozen=True)
class Answer:
    """The policy's final list for one request, with what the response and the metrics report about it."""

    final: RankedList
    cold_start: bool
    partial: bool  # an index shard did not answer: retrieval served the other shards' candidates
    store_fallback: bool  # the online store did not answer: the user's state was taken as empty
    now: float  # unix seconds the policy judged recency and novelty by
    timings_ms: dict[str, float]
    stage_versions: dict[str, str]  # the version of retrieval's tower, of the index and of the ranker
    # What the policy ran on, logged beside the impressions so that a replay re-runs any policy on it
    # (`training.evaluation.served_replay`): the ranked list and the user's purchase times.
    ranked: RankedList | None = None
    bought_at: dict[str, float] | None = None

    def mixed(self, version: str) -> dict[str, str]:
        """The parts that do not belong to `version` (empty: the answer is all one version's)."""
        return {part: v for part, v in self.stage_versions.items() if v != version}


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


async def answer(user_id: str, context: dict, k: int, stages: VersionStages, store: StoreClient,
                 policy: PolicyConfig, request_id: str, candidates: int,
                 item_filter: ItemFilter = ItemFilter(), timeout_s: float = STAGE_TIMEOUT_S,
                 store_timeout_s: float = STORE_TIMEOUT_S) -> Answer:
    """Runs one request through the stages of its version.

    Args:
        context: the request context (country, device, page, category, query).
        policy: the request's policy (surface preset and overrides applied); its `sponsored_items` are ranked with
            the candidates so the policy can place them.
        candidates: how many items retrieval hands to ranking.
        item_filter: the request's filters, applied inside the index search.
        timeout_s: the limit of each stage call.
        store_timeout_s: the limit of the online store's answer, past which the request goes on without it.
    Raises:
        StageUnavailable: a stage shed the request, did not answer within `timeout_s`, or lost its replica twice.
    """
    t0 = time.perf_counter()
    state, store_fallback = await user_state(store, user_id, store_timeout_s)
    t1 = time.perf_counter()
    retrieval_request = RetrievalRequest(state, context, candidates, item_filter)
    found = await _call("retrieval", lambda: stages.retrieval.retrieve.remote(retrieval_request), timeout_s)
    t2 = time.perf_counter()
    wants_new = policy.explore_epsilon > 0 or policy.min_new > 0  # the policy draws from the retrieved new items
    new_since = (found.now or time.time()) - policy.new_item_days * SECONDS_PER_DAY if wants_new else None
    rank_request = RankRequest(found, max(RANKED_PER_K * k, MIN_RANKED), tuple(policy.sponsored_items), new_since)
    ranked = await _call("ranking", lambda: stages.ranking.rank.remote(rank_request), timeout_s)
    t3 = time.perf_counter()
    now = found.now or time.time()  # retrieval's clock: the time line the version's data lives on
    rng = policy_rng(policy, request_id)
    final = apply_policy(ranked, UserState(state["bought_at"], now), policy, rng)
    timings = {"features": (t1 - t0) * 1000.0, "retrieval": (t2 - t1) * 1000.0, "ranking": (t3 - t2) * 1000.0,
               "policy": _ms(t3)}
    versions = {"retrieval": found.version, "index": found.index_version, "ranking": ranked.version}
    return Answer(final, found.cold_start, found.partial, store_fallback, now, timings, versions, ranked,
                  state["bought_at"])
