"""Impression logs: what serving showed, read back and joined with what the users did next.

Every answer of `POST /recommend` is logged as one row per shown item (`IMPRESSIONS_SCHEMA`; written by
`deployments.ingress.impressions`): rolling Parquet files under a folder, or a Redis stream when the online store
is Redis. They are the training data of the next version (issue: "learning from what we serve").

Beside them, one row per answer records what the policy ran on (`POLICY_INPUTS_SCHEMA`: the ranked list, the
user's purchases, the resolved policy), under `<folder>/_requests/` (a folder starting with "_" is hidden from the
impression reader, as in Hive-style datasets) or in each Redis entry's "request" field, so that
`training.evaluation.served_replay` can re-run any policy on the requests that were served.

`condition_triples` keeps, of the items an explicit condition retrieved, those the user then engaged with: the
(condition, user, item) triples the multi-interest model's conditions learn from (written beside a loop shop's
tables).

`label_impressions` joins them with the events that followed, point-in-time correct: an impression served at s is
labelled with the user's click / add_to_cart / purchase of that item at a time t with s < t <= s + window. An event
at or before s never labels it (it happened before the item was shown: the label would leak the past), nor does
one after the window.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from training.data.schemas import CONDITIONS_FILE

IMPRESSIONS_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("version", pa.string(), nullable=False),
    pa.field("surface", pa.string(), nullable=False),  # the page the answer was for (the policy's preset)
    pa.field("position", pa.int32(), nullable=False),  # 0-based slot in the answer
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("score", pa.float32(), nullable=False),  # the ranker's score (retrieval's where it did not rank)
    pa.field("reason", pa.string(), nullable=False),  # the interest / condition that retrieved it, or the rule
    pa.field("propensity", pa.float64(), nullable=False),  # P(the policy placed this item at this position)
    pa.field("served_at", pa.timestamp("ms", tz="UTC"), nullable=False),  # on the serving clock
])
POLICY_INPUTS_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("version", pa.string(), nullable=False),
    pa.field("surface", pa.string(), nullable=False),
    pa.field("k", pa.int32(), nullable=False),  # items the answer showed
    pa.field("served_at", pa.timestamp("ms", tz="UTC"), nullable=False),
    pa.field("now", pa.float64(), nullable=False),  # unix seconds the policy judged recency by (the serving clock)
    pa.field("policy", pa.string(), nullable=False),  # JSON of the resolved PolicyConfig (preset and overrides)
    pa.field("bought_at", pa.string(), nullable=False),  # JSON {item_id: unix seconds} of the user's purchases
    pa.field("items", pa.list_(pa.string()), nullable=False),  # the ranked list the policy got, best first
    pa.field("scores", pa.list_(pa.float32()), nullable=False),
    pa.field("brands", pa.list_(pa.string()), nullable=False),
    pa.field("categories", pa.list_(pa.string()), nullable=False),
    pa.field("reasons", pa.list_(pa.string()), nullable=False),
    pa.field("created_at", pa.list_(pa.float64())),  # null: no item counted as new
    pa.field("in_stock", pa.list_(pa.bool_())),  # null: every item in stock
])
REQUESTS_DIR = "_requests"  # under the impression folder
STREAM = "recsys:impressions"  # the Redis stream's key
LABELS = ("click", "add_to_cart", "purchase")
LABEL_ACTIONS = {"click": ("click", "wishlist", "add_to_cart", "purchase"),  # any engagement implies a click
                 "add_to_cart": ("add_to_cart", "purchase"), "purchase": ("purchase",)}


def read_impressions(spec: str | Path) -> pa.Table:
    """Every impression of a log: a folder of Parquet parts (searched recursively) or a redis:// URL."""
    spec = str(spec)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return _read_stream(spec)
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no impression log folder")
    return _read_parts(folder, IMPRESSIONS_SCHEMA, "an impression log part").sort_by(
        [("served_at", "ascending"), ("request_id", "ascending"), ("position", "ascending")])


def read_policy_inputs(spec: str | Path) -> pa.Table:
    """What the policy ran on for every logged answer (`POLICY_INPUTS_SCHEMA`), from the same spec as
    `read_impressions`; empty for a log written before the policy inputs were logged."""
    spec = str(spec)
    if spec.startswith(("redis://", "rediss://", "unix://")):
        return _read_stream(spec, "request")
    folder = Path(spec)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no impression log folder")
    sub = folder / REQUESTS_DIR
    if not sub.is_dir():
        return POLICY_INPUTS_SCHEMA.empty_table()
    return _read_parts(sub, POLICY_INPUTS_SCHEMA, "a policy input log part", hidden_ok=True).sort_by(
        [("served_at", "ascending"), ("request_id", "ascending")])


def _read_parts(folder: Path, schema: pa.Schema, what: str, hidden_ok: bool = False) -> pa.Table:
    parts = sorted(p for p in folder.rglob("*.parquet")
                   if hidden_ok or not any(d.startswith(("_", ".")) for d in p.relative_to(folder).parts[:-1]))
    if not parts:
        return schema.empty_table()
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part, schema=schema))
        except (pa.ArrowInvalid, OSError) as e:
            raise ValueError(f"{part}: not {what} ({e})") from e
    return pa.concat_tables(tables)


def _read_stream(url: str, field: str = "rows") -> pa.Table:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    rows: list[dict] = []
    last = "-"
    while True:
        batch = client.xrange(STREAM, min=last, max="+", count=10_000)
        batch = [b for b in batch if b[0] != last]
        if not batch:
            break
        for _, fields in batch:
            if field == "rows":
                rows += json.loads(fields["rows"])
            elif field in fields:
                rows.append(json.loads(fields[field]))
        last = batch[-1][0]
    return rows_to_table(rows) if field == "rows" else policy_inputs_to_table(rows)


def rows_to_table(rows: list[dict]) -> pa.Table:
    """Impression rows (dicts with `IMPRESSIONS_SCHEMA` names; served_at in unix seconds) as a table."""
    return _to_table(rows, IMPRESSIONS_SCHEMA)


def policy_inputs_to_table(rows: list[dict]) -> pa.Table:
    """Policy input rows (dicts with `POLICY_INPUTS_SCHEMA` names; served_at in unix seconds) as a table."""
    return _to_table(rows, POLICY_INPUTS_SCHEMA)


def _to_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    if not rows:
        return schema.empty_table()
    cols = {f.name: [r[f.name] for r in rows] for f in schema}
    cols["served_at"] = (np.asarray(cols["served_at"], dtype=np.float64) * 1000.0).astype(np.int64)
    return pa.Table.from_pydict(cols, schema=schema)


def label_impressions(impressions: pa.Table, events: pa.Table, window_s: float = 3600.0) -> pa.Table:
    """The impressions with one bool column per `LABELS`: did the user do that with the item after seeing it.

    Args:
        impressions: `IMPRESSIONS_SCHEMA` rows.
        events: EVENTS_SCHEMA rows (user_id, item_id, timestamp, action), any order.
        window_s: how long after the impression an action still counts as its outcome.
    """
    out = impressions
    for label in LABELS:
        out = out.append_column(label, pa.array(~np.isnan(_first_outcome(impressions, events, label, window_s))))
    return out


def _first_outcome(impressions: pa.Table, events: pa.Table, label: str, window_s: float) -> np.ndarray:
    """(n,) float ms of the first `label` event of the same user and item strictly after each impression and within
    `window_s`; NaN where there is none."""
    if window_s <= 0:
        raise ValueError(f"window_s must be > 0, got {window_s}")
    out = np.full(impressions.num_rows, np.nan)
    chosen = events.filter(pc.is_in(events["action"], pa.array(list(LABEL_ACTIONS[label]))))
    if impressions.num_rows == 0 or chosen.num_rows == 0:
        return out
    imp = pd.DataFrame({"row": np.arange(impressions.num_rows),
                        "user_id": impressions["user_id"].to_pylist(), "item_id": impressions["item_id"].to_pylist(),
                        "t": impressions["served_at"].cast(pa.int64()).to_numpy()})
    ev = pd.DataFrame({"user_id": chosen["user_id"].to_pylist(), "item_id": chosen["item_id"].to_pylist(),
                       "t_event": chosen["timestamp"].cast(pa.int64()).to_numpy()})
    joined = pd.merge_asof(imp.sort_values("t"), ev.sort_values("t_event"), left_on="t", right_on="t_event",
                           by=["user_id", "item_id"], direction="forward", allow_exact_matches=False,
                           tolerance=int(window_s * 1000))
    out[joined["row"].to_numpy()] = joined["t_event"].to_numpy(dtype=np.float64)
    return out


CONDITION_REASON = "condition:category="  # the reason of an item an explicit condition retrieved
CONDITIONS_SCHEMA = pa.schema([
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("item_id", pa.string(), nullable=False),
    pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),  # of the engagement (the click)
    pa.field("category", pa.string(), nullable=False),  # the condition that retrieved the item
])


def condition_triples(impressions: pa.Table, events: pa.Table, window_s: float = 3600.0) -> pa.Table:
    """The logged (condition, user, item) triples: every impression an explicit condition retrieved (reason
    "condition:category=<c>") that the user then engaged with (a click or more, within `window_s`), with the time of
    that engagement; `CONDITIONS_SCHEMA` rows, the first triple per (user, item, time).

    The condition is associated with the engagement when it is logged, as the conditional-retrieval design intends:
    the multi-interest model's conditioned query learns that this user, under this condition, engages with this
    item (`training.fit.retrieval.MultiInterestRetrieval`), not only that an item belongs to its category.
    """
    reason = impressions["reason"]
    chosen = impressions.filter(pc.starts_with(reason, CONDITION_REASON))
    t = _first_outcome(chosen, events, "click", window_s)
    hit = ~np.isnan(t)
    rows = chosen.filter(pa.array(hit))
    table = pa.table({"user_id": rows["user_id"], "item_id": rows["item_id"],
                      "timestamp": pa.array(t[hit].astype(np.int64), pa.int64()).cast(CONDITIONS_SCHEMA.field(
                          "timestamp").type),
                      "category": pc.utf8_slice_codeunits(rows["reason"], len(CONDITION_REASON))},
                     schema=CONDITIONS_SCHEMA)
    df = table.to_pandas().drop_duplicates(["user_id", "item_id", "timestamp"])
    return pa.Table.from_pandas(df, schema=CONDITIONS_SCHEMA, preserve_index=False).sort_by("timestamp")


def write_condition_triples(triples: pa.Table, shop_dir: str | Path) -> Path:
    """Writes `triples` (`CONDITIONS_SCHEMA`) beside a shop's tables."""
    path = Path(shop_dir) / CONDITIONS_FILE
    pq.write_table(triples.select(CONDITIONS_SCHEMA.names).cast(CONDITIONS_SCHEMA), path)
    return path


def read_condition_triples(shop_dir: str | Path) -> pa.Table | None:
    """A shop's logged condition triples, or None when it has none (a shop that no served log fed)."""
    path = Path(shop_dir) / CONDITIONS_FILE
    if not path.is_file():
        return None
    try:
        return pq.read_table(path, schema=CONDITIONS_SCHEMA)
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a table of condition triples ({e})") from e
