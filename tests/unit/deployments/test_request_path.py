"""The orchestrator's failure modes: a stage that sheds the request (its queue is full) or never answers becomes a
`StageUnavailable` at once, which the ingress answers with 503/429 and Retry-After instead of waiting forever."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.serve.exceptions import BackPressureError

from deployments.ingress.request_path import StageUnavailable, answer
from deployments.store import local_store
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
