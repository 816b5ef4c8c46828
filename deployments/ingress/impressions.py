"""The ingress's impression log: every answer's shown items, written off the request path.

`ImpressionLog.record` only appends to a bounded in-memory buffer (no I/O, no await): a full buffer drops the
answer's rows and counts them (`recsys_impressions_dropped`), so logging never blocks or fails a request. A
background task flushes the buffer every `flush_s` (or once it holds `flush_rows`) to its sink in a worker thread:

- `ParquetSink`: one Parquet part per flush under `<folder>/date=<YYYY-MM-DD>/`, written to a temporary name
  and renamed, so a reader never sees half a file (rolling files; `training.data.impressions.read_impressions`),
  and one of the answers' policy inputs under `<folder>/_requests/date=<YYYY-MM-DD>/`;
- `RedisSink`: one stream entry per answer (`XADD recsys:impressions`, its rows and its policy input as JSON),
  trimmed to about `max_entries`, when the online store is Redis.

Each answer is logged with what its policy ran on (`policy_input_row`: the ranked list, the user's purchases,
the resolved policy), so that a replay can re-run other policies on the served requests
(`training.evaluation.served_replay`).

A sink that fails drops that flush's rows (counted, logged); the next flush tries again.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from training.data.impressions import REQUESTS_DIR, STREAM, policy_inputs_to_table, rows_to_table
from training.request.contracts import RankedList
from training.request.policy_config import PolicyConfig

logger = logging.getLogger("ray.serve")
Entry = tuple[list[dict], "dict | None"]  # one answer: its impression rows and its policy input


class ParquetSink:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.name = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"  # one writer per replica: parts never collide
        self.seq = 0

    def write(self, answers: list[Entry]) -> None:
        rows = [r for answer, _ in answers for r in answer]
        requests = [request for _, request in answers if request is not None]
        day = time.strftime("%Y-%m-%d", time.gmtime(rows[0]["served_at"] if rows else time.time()))
        self.seq += 1
        if requests:  # first: an impression part is never on disk without the inputs of its answers
            self._write(policy_inputs_to_table(requests), self.folder / REQUESTS_DIR / f"date={day}")
        if rows:
            self._write(rows_to_table(rows), self.folder / f"date={day}")

    def _write(self, table: Any, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"part-{self.name}-{self.seq:06d}.parquet"
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)

    def __repr__(self) -> str:
        return f"ParquetSink({self.folder})"


class RedisSink:
    def __init__(self, url: str, max_entries: int = 1_000_000) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2.0)
        self.max_entries = max_entries

    def write(self, answers: list[Entry]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for rows, request in answers:
            fields = {"rows": json.dumps(rows)} | ({"request": json.dumps(request)} if request is not None else {})
            pipe.xadd(STREAM, fields, maxlen=self.max_entries, approximate=True)
        pipe.execute()

    def __repr__(self) -> str:
        return "RedisSink"


def open_impression_sink(spec: str) -> ParquetSink | RedisSink | None:
    """"" (off), a redis:// URL, or a folder."""
    if not spec:
        return None
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return RedisSink(spec)
    return ParquetSink(spec)


def answer_rows(request_id: str, user_id: str, version: str, surface: str, final: RankedList, k: int,
                served_at: float) -> list[dict[str, Any]]:
    """The shown items of one answer (its first k) as impression rows."""
    n = min(k, len(final))
    propensity = final.propensity if final.propensity is not None else [1.0] * len(final)
    return [{"request_id": request_id, "user_id": user_id, "version": version, "surface": surface, "position": i,
             "item_id": final.item_ids[i], "score": float(final.scores[i]), "reason": final.reasons[i],
             "propensity": float(propensity[i]), "served_at": served_at} for i in range(n)]


def policy_input_row(request_id: str, user_id: str, version: str, surface: str, k: int, policy: PolicyConfig,
                     ranked: RankedList, bought_at: dict[str, float], served_at: float) -> dict[str, Any]:
    """What one answer's policy ran on (`training.data.impressions.POLICY_INPUTS_SCHEMA`)."""
    return {"request_id": request_id, "user_id": user_id, "version": version, "surface": surface,
            "k": min(k, len(ranked)), "served_at": served_at, "now": served_at,
            "policy": json.dumps(policy.to_dict()),
            "bought_at": json.dumps({i: float(t) for i, t in bought_at.items()}),
            "items": list(ranked.item_ids), "scores": ranked.scores.tolist(), "brands": list(ranked.brands),
            "categories": list(ranked.categories), "reasons": list(ranked.reasons),
            "created_at": None if ranked.created_at is None else ranked.created_at.tolist(),
            "in_stock": None if ranked.in_stock is None else ranked.in_stock.tolist()}


class ImpressionLog:
    """Bounded buffer + background flush; `record` never blocks. The bound counts impression rows plus the items
    of each policy input, so the buffer's memory is bounded whatever the answers' lengths."""

    def __init__(self, sink: Any, max_rows: int = 200_000, flush_rows: int = 20_000, flush_s: float = 5.0,
                 on_drop: Any = None) -> None:
        self.sink, self.max_rows, self.flush_rows, self.flush_s = sink, max_rows, flush_rows, flush_s
        self.buffer: list[Entry] = []
        self.rows = 0  # rows (impressions + policy input items) in the buffer
        self.written = self.dropped = 0
        self.on_drop = on_drop  # called with the number of rows dropped (a metric counter)
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def record(self, rows: list[dict], request: dict | None = None) -> bool:
        """Buffers one answer's rows (and its policy input); False (and its rows counted) when the buffer is full."""
        size = len(rows) + (len(request["items"]) if request is not None else 0)
        if self.rows + size > self.max_rows:
            self._drop(len(rows))
            return False
        self.buffer.append((rows, request))
        self.rows += size
        if self.rows >= self.flush_rows:
            self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self.on_drop is not None:
            self.on_drop(n)

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), self.flush_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
            await self.flush()

    async def flush(self) -> int:
        """Writes what the buffer holds now; the rows written (0 on failure, the rows then counted as dropped)."""
        if not self.buffer:
            return 0
        answers = self.buffer
        n = sum(len(rows) for rows, _ in answers)
        self.buffer, self.rows = [], 0
        try:
            await asyncio.to_thread(self.sink.write, answers)
        except Exception as e:  # noqa: BLE001 - logging must never take the ingress down
            self._drop(n)
            logger.warning(f"impression log {self.sink!r}: {n} rows dropped: {type(e).__name__}: {e}")
            return 0
        self.written += n
        return n

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.flush()
