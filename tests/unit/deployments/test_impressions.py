"""The impression log (deployments/ingress/impressions.py) and reading it back joined with outcomes
(training/data/impressions.py): never blocking, bounded, durable in Parquet or Redis, point-in-time labels."""
from __future__ import annotations

import asyncio
import json
import uuid

import numpy as np
import pyarrow as pa
import pytest

from deployments.ingress.impressions import ImpressionLog, ParquetSink, RedisSink, answer_rows, policy_input_row
from training.data.impressions import (
    IMPRESSIONS_SCHEMA,
    POLICY_INPUTS_SCHEMA,
    condition_triples,
    label_impressions,
    read_condition_triples,
    read_impressions,
    read_policy_inputs,
    write_condition_triples,
)
from training.data.schemas import TIMESTAMP, snapshot_id, write_shop
from training.data.synthetic import generate_shop
from training.request.contracts import RankedList
from training.request.policy_config import PolicyConfig

T0 = 1_790_000_000.0


def _final(n: int = 4) -> RankedList:
    return RankedList(item_ids=[f"i{j}" for j in range(n)], scores=np.linspace(1, 0, n), brands=["b"] * n,
                      categories=["c"] * n, reasons=["interest:0", "policy:explore", "retrieval", "condition:x"][:n],
                      propensity=[1.0, 0.05, 0.9, 0.9][:n])


def test_answer_rows_hold_what_was_shown_with_reason_and_propensity():
    rows = answer_rows("r1", "u1", "v1", "home", _final(), k=3, served_at=T0)
    assert [r["item_id"] for r in rows] == ["i0", "i1", "i2"] and [r["position"] for r in rows] == [0, 1, 2]
    assert rows[1]["reason"] == "policy:explore" and rows[1]["propensity"] == 0.05
    assert {r["request_id"] for r in rows} == {"r1"} and rows[0]["served_at"] == T0


def test_parquet_parts_are_read_back_whole_and_in_order(tmp_path):
    async def run():
        log = ImpressionLog(ParquetSink(tmp_path / "imp"), flush_s=3600)
        for i in range(5):
            assert log.record(answer_rows(f"r{i}", f"u{i % 2}", "v1", "home", _final(), 4, T0 + i))
        assert await log.flush() == 20 and log.written == 20
        log.record(answer_rows("r9", "u9", "v2", "search", _final(), 2, T0 + 9))
        await log.close()
    asyncio.run(run())
    assert len(list((tmp_path / "imp").rglob("*.parquet"))) == 2 and not list((tmp_path / "imp").rglob("*.tmp"))
    table = read_impressions(tmp_path / "imp")
    assert table.schema == IMPRESSIONS_SCHEMA and table.num_rows == 22
    assert table["request_id"].to_pylist()[:4] == ["r0"] * 4 and table["surface"].to_pylist()[-1] == "search"


def test_a_full_buffer_or_a_failing_sink_drops_and_counts_never_raises(tmp_path):
    class Broken:
        def write(self, answers):
            raise ConnectionError("log down")

    async def run():
        drops = []
        log = ImpressionLog(Broken(), max_rows=10, flush_s=3600, on_drop=drops.append)
        assert log.record(answer_rows("a", "u", "v1", "home", _final(), 4, T0))
        assert log.record(answer_rows("b", "u", "v1", "home", _final(), 4, T0))
        assert not log.record(answer_rows("c", "u", "v1", "home", _final(), 4, T0))  # 12 > 10 rows
        assert await log.flush() == 0  # the sink failed: its rows count as dropped, nothing raises
        await log.close()
        return log, drops
    log, drops = asyncio.run(run())
    assert log.dropped == 12 and drops == [4, 8] and log.written == 0


def test_the_redis_stream_holds_every_answer(redis_url):
    import redis

    sink = RedisSink(redis_url)
    redis.Redis.from_url(redis_url).delete("recsys:impressions")
    sink.write([(answer_rows(f"r{i}", "u", "v1", "home", _final(), 4, T0 + i),
                 _policy_input(f"r{i}", T0 + i) if i else None) for i in range(3)])
    table = read_impressions(redis_url)
    assert table.num_rows == 12 and sorted(set(table["request_id"].to_pylist())) == ["r0", "r1", "r2"]
    inputs = read_policy_inputs(redis_url)
    assert inputs.schema == POLICY_INPUTS_SCHEMA and inputs["request_id"].to_pylist() == ["r1", "r2"]


def _policy_input(request_id: str, served_at: float) -> dict:
    ranked = _final()
    ranked.created_at, ranked.in_stock = np.full(4, T0 - 5.0), np.array([True, False, True, True])
    return policy_input_row(request_id, "u1", "v1", "home", 3, PolicyConfig(shuffle_epsilon=0.2),
                            ranked, {"i2": T0 - 60.0}, served_at)


def test_each_answer_is_logged_with_what_its_policy_ran_on_and_hidden_from_the_impression_reader(tmp_path):
    """The policy inputs land under `_requests/` beside the impression parts; the impression reader skips them, and
    a row holds all a replay needs to re-run a policy on the request."""
    async def run():
        log = ImpressionLog(ParquetSink(tmp_path / "imp"), flush_s=3600)
        for i in range(3):
            assert log.record(answer_rows(f"r{i}", "u1", "v1", "home", _final(), 3, T0 + i),
                              _policy_input(f"r{i}", T0 + i))
        await log.close()
    asyncio.run(run())
    assert read_impressions(tmp_path / "imp").num_rows == 9
    inputs = read_policy_inputs(tmp_path / "imp")
    assert inputs.schema == POLICY_INPUTS_SCHEMA and inputs.num_rows == 3
    row = inputs.to_pylist()[0]
    assert row["items"] == ["i0", "i1", "i2", "i3"] and row["in_stock"] == [True, False, True, True]
    assert PolicyConfig.from_dict(json.loads(row["policy"])).shuffle_epsilon == 0.2
    assert json.loads(row["bought_at"]) == {"i2": T0 - 60.0} and row["k"] == 3 and row["now"] == T0


def test_a_log_without_policy_inputs_reads_as_none_and_a_missing_folder_is_an_error(tmp_path):
    (tmp_path / "imp").mkdir()
    assert read_policy_inputs(tmp_path / "imp").num_rows == 0
    with pytest.raises(FileNotFoundError, match="no impression log folder"):
        read_policy_inputs(tmp_path / "nope")


def test_labels_are_point_in_time_correct():
    imp = pa.Table.from_pylist([
        {"request_id": "r", "user_id": "u1", "version": "v1", "surface": "home", "position": 0, "item_id": "a",
         "score": 1.0, "reason": "retrieval", "propensity": 1.0, "served_at": int(T0 * 1000)},
        {"request_id": "r", "user_id": "u1", "version": "v1", "surface": "home", "position": 1, "item_id": "b",
         "score": 0.5, "reason": "retrieval", "propensity": 1.0, "served_at": int(T0 * 1000)},
        {"request_id": "s", "user_id": "u2", "version": "v1", "surface": "home", "position": 0, "item_id": "a",
         "score": 1.0, "reason": "retrieval", "propensity": 1.0, "served_at": int(T0 * 1000)},
    ], schema=IMPRESSIONS_SCHEMA)
    ms = lambda s: int((T0 + s) * 1000)
    events = pa.table({"user_id": ["u1", "u1", "u1", "u2", "u1"], "item_id": ["a", "a", "b", "a", "b"],
                       "timestamp": pa.array([ms(-60), ms(0), ms(7200), ms(30), ms(10)], type=TIMESTAMP),
                       "action": ["purchase", "click", "click", "add_to_cart", "view"]})
    out = label_impressions(imp, events, window_s=3600)
    # u1/a: a purchase before it was shown and a click at the same instant: neither is its outcome (leakage).
    # u1/b: a click 2 h later, outside the window; the view inside it is no click. u2/a: a cart after 30 s.
    assert out["click"].to_pylist() == [False, False, True]
    assert out["add_to_cart"].to_pylist() == [False, False, True]
    assert out["purchase"].to_pylist() == [False, False, False]
    wide = label_impressions(imp, events, window_s=3 * 3600)
    assert wide["click"].to_pylist() == [False, True, True]
    with pytest.raises(ValueError, match="window_s"):
        label_impressions(imp, events, window_s=0)


def test_condition_triples_are_the_engagements_an_explicit_condition_led_to(tmp_path):
    def shown(user: str, item: str, reason: str, position: int) -> dict:
        return {"request_id": f"r-{user}", "user_id": user, "version": "v2", "surface": "home", "position": position,
                "item_id": item, "score": 1.0, "reason": reason, "propensity": 1.0, "served_at": int(T0 * 1000)}

    imp = pa.Table.from_pylist([shown("u1", "a", "condition:category=shoes", 0), shown("u1", "b", "interest:0", 1),
                                shown("u1", "c", "condition:category=bags", 2),
                                shown("u2", "a", "condition:category=shoes", 0)], schema=IMPRESSIONS_SCHEMA)
    ms = lambda s: int((T0 + s) * 1000)
    events = pa.table({"user_id": ["u1", "u1", "u1", "u1", "u2", "u1"], "item_id": ["a", "a", "b", "c", "a", "a"],
                       "timestamp": pa.array([ms(20), ms(40), ms(25), ms(-5), ms(30), ms(50)], type=TIMESTAMP),
                       "action": ["click", "purchase", "click", "click", "view", "view"]})
    triples = condition_triples(imp, events, window_s=3600)
    # u1/a: the click (the first engagement) after the shoes condition showed it; u1/b came from an interest; u1/c
    # was clicked before it was shown; u2/a was only viewed.
    assert triples.to_pylist() == [{"user_id": "u1", "item_id": "a", "timestamp": triples["timestamp"][0].as_py(),
                                    "category": "shoes"}]
    assert triples["timestamp"].cast(pa.int64()).to_pylist() == [ms(20)]
    shop = tmp_path / "shop"
    write_shop(generate_shop("tiny", seed=0), shop)
    before = snapshot_id(shop)
    assert read_condition_triples(shop) is None
    write_condition_triples(triples, shop)
    assert read_condition_triples(shop).equals(triples) and snapshot_id(shop) != before  # training data too
    write_shop(generate_shop("tiny", seed=0), shop)  # a new shop in the folder: the old triples are not its own
    assert read_condition_triples(shop) is None and snapshot_id(shop) == before
    (shop / "conditions.parquet").write_text("not parquet")
    with pytest.raises(ValueError, match="conditions.parquet"):
        read_condition_triples(shop)


def test_a_folder_without_a_log_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no impression log"):
        read_impressions(tmp_path / f"nothing-{uuid.uuid4().hex}")
