"""Access rules that need no cluster: API keys, the client/operator split of overrides, the body limit."""
from __future__ import annotations

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.testclient import TestClient

from deployments.ingress.access import (BodyLimit, CLIENT_POLICY_FIELDS, api_key_digests, check_api_key, digest,
                                        operator_fields)
from training.request.policy_config import PolicyConfig


def test_api_keys_are_off_without_keys_and_401_or_403_with_them():
    check_api_key(None, api_key_digests(None, env=""))  # off: anything goes
    keys = api_key_digests([digest("k-config")], env="k-env1, k-env2")
    for good in ("k-config", "k-env1", "k-env2"):
        check_api_key(good, keys)
    for given, status in ((None, 401), ("", 401), ("k-wrong", 403)):
        with pytest.raises(HTTPException) as e:
            check_api_key(given, keys)
        assert e.value.status_code == status and "k-" not in str(e.value.detail)  # never echoes a key
    with pytest.raises(ValueError, match="api_keys_sha256"):
        api_key_digests(["not-a-digest"], env="")


def test_every_policy_field_but_the_client_ones_is_an_operators():
    every = set(PolicyConfig().to_dict())
    assert CLIENT_POLICY_FIELDS < every
    assert set(operator_fields({f: None for f in every})) == every - CLIENT_POLICY_FIELDS
    for protected in ("filter_out_of_stock", "blocked_brands", "sponsored_items", "explore_epsilon", "min_new",
                      "surfaces"):
        assert operator_fields({protected: 1}) == [protected]
    assert operator_fields(None) == [] and operator_fields({"brand_diversity": False}) == []
    assert operator_fields({"no_such_rule": 1}) == []  # unknown: the policy's validation answers 422 naming it


def test_policy_lists_and_strings_are_bounded_with_a_short_message():
    with pytest.raises(ValueError, match="sponsored_items") as e:
        PolicyConfig(sponsored_items=tuple(f"i{k}" for k in range(5000)))
    assert len(str(e.value)) < 400
    for bad in ({"blocked_brands": ["x" * 129]}, {"explore_slots": list(range(200))}, {"sponsored_slots": [10 ** 6]},
                {"surfaces": {f"p{k}": {} for k in range(65)}}, {"surfaces": {"x" * 33: {}}}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PolicyConfig.from_dict(bad)


@pytest.fixture
def echo():
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=100)

    @app.post("/echo")
    async def post(body: dict) -> dict:
        return {"n": len(body["s"])}
    return TestClient(app)


def test_a_body_over_the_limit_is_a_413_by_length_or_while_streaming(echo):
    assert echo.post("/echo", json={"s": "x" * 50}).json() == {"n": 50}
    big = echo.post("/echo", json={"s": "x" * 200})
    assert big.status_code == 413 and "over 100 bytes" in big.json()["detail"]

    def chunks():  # no Content-Length: the limit trips on the bytes received
        yield b'{"s": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'
    assert echo.post("/echo", content=chunks(), headers={"content-type": "application/json"}).status_code == 413
    assert echo.post("/echo", content=b"{}", headers={"content-length": "abc"}).status_code in (400, 413)
