"""The bad-input fuzzer against a real HTTP server: a small FastAPI app served by uvicorn in a thread, with one route
that fails with a 500 for half of its valid inputs, one that behaves, and one behind a bearer token."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Header, HTTPException
from pydantic import BaseModel, Field

from bench.fuzz import fuzz, main, names_field

TOKEN = "test-admin-token"
CASES = 20  # per operation: 10 valid, 10 invalid, each sent twice (without and with the token)
app = FastAPI(title="fuzz target")
authorized = Counter()  # admin calls that carried the token, by route


class OrderRequest(BaseModel):
    item_id: int = Field(ge=0)
    quantity: int = Field(ge=1, le=100)
    note: str | None = Field(None, max_length=50)


@app.post("/orders")
def create_order(req: OrderRequest) -> dict:
    if req.quantity > 50:  # the deliberate bug: half of the valid quantities crash
        return {"per_unit": 1 // 0}
    return {"item_id": req.item_id, "quantity": req.quantity}


@app.get("/items/{item_id}")
def get_item(item_id: int, verbose: bool = False) -> dict:
    if item_id > 1000:
        raise HTTPException(404, f"item {item_id} not found")
    return {"item_id": item_id, "verbose": verbose}


@app.get("/admin/stats")
def admin_stats(authorization: str | None = Header(None)) -> dict:
    if authorization != f"Bearer {TOKEN}":
        raise HTTPException(401, "admin: send 'Authorization: Bearer <token>'")
    authorized["/admin/stats"] += 1
    return {"orders": 0}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    """The app on a port the OS picks (port 0: no race for a free one), served until the module's tests end."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.monotonic() + 60.0  # a readiness wait, not a measurement: only a server that never starts fails it
    while not server.started:
        assert thread.is_alive() and time.monotonic() < end, "uvicorn did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


@pytest.fixture(scope="module")
def result(base_url: str) -> dict:
    authorized.clear()
    return fuzz(base_url, CASES, TOKEN, seed=0)


def test_every_operation_is_fuzzed_admin_ones_included(result):
    assert set(result["per_operation"]) == {"POST /orders", "GET /items/{item_id}", "GET /admin/stats"}
    assert all(n > 0 for n in result["per_operation"].values())
    assert result["requests"] == sum(result["per_operation"].values())
    assert result["requests"] == sum(result["by_status"].values()) + result["timeouts"] + result["transport_errors"]
    assert {"positive", "negative"} <= set(result["by_mode"])


def test_the_deliberate_500_is_found_and_counted(result):
    assert result["server_errors"] > 0
    assert result["server_errors"] == sum(n for status, n in result["by_status"].items() if status >= 500)
    assert result["server_errors_per_operation"] == {"POST /orders": result["server_errors"]}
    assert 0 < len(result["server_error_examples"]) <= 5
    for example in result["server_error_examples"]:
        assert (example["method"], example["path"], example["status"]) == ("POST", "/orders", 500)
        assert example["body"]["quantity"] > 50


def test_the_well_behaved_endpoints_answer_no_5xx(result):
    assert "GET /items/{item_id}" not in result["server_errors_per_operation"]
    assert "GET /admin/stats" not in result["server_errors_per_operation"]
    assert result["timeouts"] == result["transport_errors"] == 0


def test_each_case_is_sent_with_the_admin_token_too(result):
    assert authorized["/admin/stats"] > 0
    assert result["by_status"][401] > 0  # and without it


def test_the_cli_writes_what_fuzz_returns_for_the_same_seed(base_url, tmp_path, capsys):
    out = tmp_path / "fuzz.json"
    main(["--url", base_url, "--cases", "4", "--seed", "7", "--out", str(out)])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    again = json.loads(json.dumps(fuzz(base_url, 4, None, seed=7)))  # JSON's string keys, as printed
    assert printed.pop("seconds") > 0 and again.pop("seconds") > 0
    assert printed == again
    assert printed["max_examples"] == 4 and printed["with_admin_token"] is False


@pytest.mark.parametrize("status, body, named", [
    (422, {"detail": [{"loc": ["body", "quantity"], "msg": "too large"}]}, True),
    (422, {"detail": [{"loc": ["body", 0], "msg": "JSON decode error"}]}, True),
    (422, {"detail": [{"loc": ["body"], "msg": "Field required"}]}, True),  # the body itself is missing
    (422, {"detail": [{"loc": ["nowhere", "k"], "msg": "?"}]}, False),
    (422, {"detail": [{"loc": [], "msg": "?"}]}, False),
    (422, {"detail": [{"loc": ["query", "k"]}, {"msg": "no loc"}]}, False),
    (422, {"detail": "policy: bad value"}, False),
    (400, {"detail": "There was an error parsing the body"}, False),
    (403, {"detail": [{"loc": ["body", "policy", "sponsored"], "type": "forbidden"}]}, True),
    (401, {"detail": "admin: send 'Authorization: Bearer <token>'"}, True),
    (404, {"detail": ""}, False),
    (405, {"error": "method not allowed"}, False),
    (413, b"Request Entity Too Large", False),
])
def test_a_4xx_names_the_field_or_its_status_says_enough(status, body, named):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    assert names_field(status, content) is named


def test_rollout_bench_phases_count_failures_sheds_and_answers_that_mix_versions():
    from bench.rollout import phase_figures

    def a(t, status=200, version="v1", parts=None, shed=False):
        return {"t0": t, "t1": t + 0.05, "status": status, "shed": shed, "version": version,
                "stage_versions": parts or {"retrieval": version, "index": version, "ranking": version}}

    answers = [a(0.0), a(0.1, version="v2"), a(0.2, status=503, version=None, parts={}, shed=True),
               a(0.3, status=500, version=None, parts={}),
               a(0.4, parts={"retrieval": "v1", "index": "v1", "ranking": "v2"}), a(5.0)]
    f = phase_figures(answers, 0.0, 1.0)
    assert (f["requests"], f["failed"], f["shed"], f["mixed_versions"]) == (5, 1, 1, 1)
    assert f["served"] == {"v1": 2, "v2": 1} and f["p50_ms"] == 50.0


def test_autoscaling_bench_bins_answers_by_second_with_the_replica_counts_seen_then():
    from bench.autoscaling import per_second

    answers = [{"t0": 0.1, "t1": 0.2, "status": 200, "shed": False}, {"t0": 0.5, "t1": 1.5, "status": 200, "shed": False},
               {"t0": 1.2, "t1": 1.3, "status": 503, "shed": True}, {"t0": 1.4, "t1": 1.6, "status": 500, "shed": False}]
    replicas = [(0.0, {"recsys/Ingress": 1}), (1.5, {"recsys/Ingress": 2})]
    rows = per_second(answers, replicas, 3)
    assert [r["sent"] for r in rows] == [2, 2, 0]
    assert [(r["answered"], r["shed"], r["errors"]) for r in rows] == [(1, 0, 0), (1, 1, 1), (0, 0, 0)]
    assert rows[0]["p50_ms"] == 100.0 and rows[1]["p99_ms"] == 1000.0
    assert [r["replicas"]["recsys/Ingress"] for r in rows] == [1, 2, 2]
