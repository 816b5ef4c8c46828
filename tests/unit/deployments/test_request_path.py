"""The orchestrator's failure modes: a stage that sheds the request (its queue is full) or never answers becomes a
`StageUnavailable` at once, which the ingress answers with 503/429 and Retry-After instead of waiting forever."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from deployments.ingress.request_path import StageUnavailable, answer, user_state
from deployments.store import empty_state, local_store
from training.request.policy_config import PolicyConfig


def stage(method: str, behaviour):
    """A handle-shaped object whose `<method>.remote(...)` runs `behaviour` (the failure under test)."""
    return SimpleNamespace(**{method: SimpleNamespace(remote=lambda *args: behaviour())})


async def shed():
    raise BackPressureError(num_queued_requests=16, max_queued_requests=16, status_code=429, retry_after_s=2.0)


async def never():
    await asyncio.Event().wait()


def run(stages):
    return asyncio.run(answer("u1", {}, 10, stages, local_store(), PolicyConfig(), "r1", 100, timeout_s=0.05))


def test_a_full_stage_queue_is_shed_at_once_with_its_status_and_retry_after():
    stages = SimpleNamespace(retrieval=stage("retrieve", shed), ranking=stage("rank", never))
    with pytest.raises(StageUnavailable) as e:
        run(stages)
    assert (e.value.stage, e.value.status_code, e.value.retry_after_s) == ("retrieval", 429, 2.0)


def test_a_stage_that_never_answers_times_out_instead_of_hanging():
    stages = SimpleNamespace(retrieval=stage("retrieve", never), ranking=stage("rank", never))
    with pytest.raises(StageUnavailable, match="retrieval: no answer within") as e:
        run(stages)
    assert e.value.status_code == 503


class DyingOnce:
    """A stage whose first call dies with its replica (as a Serve handle raises it), the second answers."""

    def __init__(self, answer):
        self.calls, self.answer = 0, answer

    async def __call__(self):
        self.calls += 1
        if self.calls == 1:
            raise ActorDiedError()
        return await self.answer()


def test_a_replica_dying_under_the_request_is_retried_once_and_twice_is_a_503():
    twice = DyingOnce(DyingOnce(never))  # dies on the first call, and its answer dies too
    twice.answer.calls = 0
    with pytest.raises(StageUnavailable, match="retrieval: replica gone") as e:
        run(SimpleNamespace(retrieval=stage("retrieve", twice), ranking=stage("rank", never)))
    assert e.value.status_code == 503 and twice.calls == 2
    once = DyingOnce(shed)  # answers the retry with back-pressure: the retry happened and its outcome counts
    with pytest.raises(StageUnavailable) as e:
        run(SimpleNamespace(retrieval=stage("retrieve", once), ranking=stage("rank", never)))
    assert once.calls == 2 and e.value.status_code == 429


def test_a_dead_or_slow_store_gives_an_empty_state_flagged_as_a_fallback():
    class Dead:
        async def get(self, user_id):
            raise ActorDiedError()

    class Slow:
        async def get(self, user_id):
            await asyncio.Event().wait()

    for store in (Dead(), Slow()):
        state, fallback = asyncio.run(user_state(store, "u1", timeout_s=0.05))
        assert fallback and state == empty_state()
    state, fallback = asyncio.run(user_state(local_store(), "u1", timeout_s=1.0))
    assert not fallback and state == empty_state()
