"""Schemathesis against the live tiny stack's OpenAPI spec, a bounded number of cases per operation, admin ones
included (with a wrong token: the stack's admin token is not known here, so no live policy changes): no 5xx, no
hang, and every 4xx names what was wrong. `recsys bench reliability` runs thousands of cases with the real token."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.integration


def test_fuzzed_requests_get_no_5xx_and_4xx_answers_that_name_the_field(tiny_stack):
    from bench.fuzz import fuzz

    result = fuzz(tiny_stack["url"], max_examples=25, admin_token="not-the-token", seed=0)
    assert result["requests"] > 100 and len(result["per_operation"]) >= 6
    assert result["server_errors"] == 0, result["server_error_examples"]
    assert result["timeouts"] == 0 and result["transport_errors"] == 0
    assert result["unnamed_4xx"] == 0, result["unnamed_4xx_examples"]
