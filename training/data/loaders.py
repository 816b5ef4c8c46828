"""Data sets given by path, as a validated `Shop`: the evaluation harness reads any of them the same way.

Formats (`load_dataset(path, fmt)`):

- ``synthetic``: a shop folder written by ``recsys generate`` (`training.data.schemas.read_shop`).
- ``movielens``: a MovieLens 100K or 1M folder (`training.data.movielens.load_movielens`).
- ``taobao``: the Taobao UserBehavior CSV (no header: ``user_id,item_id,category_id,behavior_type,timestamp`` with
  unix seconds); a folder is searched for ``UserBehavior.csv``.
- ``retailrocket``: RetailRocket ``events.csv`` (header ``timestamp,visitorid,event,itemid,transactionid``, ms);
  ``item_properties*.csv`` beside it, when present, give each item its latest ``categoryid``.
- ``parquet``: a folder with ``events.parquet`` and ``catalog.parquet`` (and optionally ``users.parquet``) in the
  project schemas.

Mapping of the logs onto the shop schemas: ids keep their numbers with a prefix (``u<id>``, ``i<id>``, ``c<id>``);
a product page view is a click on the item (``pv``/``view`` -> click), ``fav`` -> wishlist, ``cart``/``addtocart``
-> add_to_cart, ``buy``/``transaction`` -> purchase. The logs carry no brand or price, so every item gets brand
``"unknown"`` and price 0.0 (as MovieLens does); ``created_at`` is the time an item was first seen. Country and
device are ``"unknown"``; position, page and query are null (not logged).
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from training.data.movielens import load_movielens
from training.data.schemas import (CATALOG_SCHEMA, EVENTS_SCHEMA, TIMESTAMP, USERS_SCHEMA, SchemaError, Shop,
                                   first_failing_row, first_row, read_meta, read_shop, read_table, validate_table)

FORMATS: tuple[str, ...] = ("synthetic", "movielens", "taobao", "retailrocket", "parquet")
TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_ACTIONS = {"pv": "click", "fav": "wishlist", "cart": "add_to_cart", "buy": "purchase"}
RETAILROCKET_COLUMNS = ("timestamp", "visitorid", "event", "itemid", "transactionid")
RETAILROCKET_ACTIONS = {"view": "click", "addtocart": "add_to_cart", "transaction": "purchase"}
UNKNOWN = "unknown"


def load_dataset(path: str | Path, fmt: str) -> Shop:
    """Loads a data set of one of `FORMATS` as a `Shop` whose tables follow training/data/schemas.py.

    Args:
        path: a file or folder, as each format expects (module docstring).
        fmt: one of `FORMATS`.

    Returns:
        The shop; ``meta["source"]`` names the format, ``meta["path"]`` the input.

    Raises:
        ValueError: an unknown format.
        SchemaError: a missing or malformed file; the message names the file, the column and the first bad row
            (CSV: its line).
    """
    path = Path(path)
    loaders = {"synthetic": read_shop, "movielens": load_movielens, "taobao": load_taobao,
               "retailrocket": load_retailrocket, "parquet": load_parquet_folder}
    if fmt not in loaders:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if not path.exists():
        raise SchemaError(f"{path}: no such file or folder (format {fmt})")
    shop = loaders[fmt](path)
    shop.meta = {**shop.meta, "source": shop.meta.get("source", fmt), "format_arg": fmt, "path": str(path)}
    return shop


def _find_file(path: Path, name: str) -> Path:
    file = path / name if path.is_dir() else path
    if not file.is_file():
        raise SchemaError(f"{file}: no such file")
    return file


def _read_csv(file: Path, names: tuple[str, ...], types: dict[str, pa.DataType], header: bool) -> pa.Table:
    """Reads a CSV with pyarrow (multi-threaded, no Python per row); a bad value names the file, column and line.

    Columns are read as strings and cast one by one, because pyarrow's own conversion errors name a column only by
    its number. Line numbers count the header but not blank lines, which pyarrow skips.
    """
    read = pcsv.ReadOptions(column_names=None if header else list(names), block_size=1 << 24)
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, include_columns=list(names),
                                  strings_can_be_null=False)
    try:
        raw = pcsv.read_csv(file, read_options=read, convert_options=convert)
    except pa.ArrowInvalid as exc:
        _raise_invalid_row(file, names, header, read, convert)
        raise SchemaError(f"{file}: cannot read CSV (expected columns {list(names)}): {exc}") from exc
    except pa.ArrowKeyError as exc:
        raise SchemaError(f"{file}: cannot read CSV (expected columns {list(names)}): {exc}") from exc
    columns = []
    for name in names:
        try:
            columns.append(pc.cast(raw[name], types[name]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            row = first_failing_row(raw[name], lambda part: pc.cast(part, types[name]))
            line = row + 1 + int(header)
            raise SchemaError(f"{file}: column '{name}' must hold {types[name]} values; line {line} holds "
                              f"{raw[name][row].as_py()!r}: {exc}") from exc
    return pa.table(dict(zip(names, columns)))


def _raise_invalid_row(file: Path, names: tuple[str, ...], header: bool, read: pcsv.ReadOptions,
                       convert: pcsv.ConvertOptions) -> None:
    """Raises the first row with the wrong number of fields (a truncated last line, a stray separator), if any.

    Only a single-threaded read numbers invalid rows, so it runs on the error path only.
    """
    rows = []

    def keep_first(row: pcsv.InvalidRow) -> str:
        rows.append(row)
        return "error"

    read = pcsv.ReadOptions(column_names=read.column_names, block_size=read.block_size, use_threads=False)
    try:
        pcsv.read_csv(file, read_options=read, convert_options=convert,
                      parse_options=pcsv.ParseOptions(invalid_row_handler=keep_first))
    except pa.ArrowInvalid as exc:
        if not rows:
            return
        row = rows[0]
        columns = _header(file) if header else list(names)
        where = (f"column '{columns[row.actual_columns]}' is missing" if row.actual_columns < len(columns)
                 else f"extra field(s) after column '{columns[-1]}'")
        raise SchemaError(f"{file}: line {row.number}: expected {row.expected_columns} fields, found "
                          f"{row.actual_columns} ({where}; a truncated or malformed row): {row.text!r}") from exc


def _header(file: Path) -> list[str]:
    with file.open(encoding="utf-8", errors="replace") as fh:
        return fh.readline().rstrip("\r\n").split(",")


def _map_actions(col: pa.ChunkedArray, mapping: dict[str, str], file: Path, column: str,
                 line_offset: int) -> pa.Array:
    """Log behaviours -> project actions; an unknown behaviour is an error naming the file, column, line and value.

    Args:
        line_offset: the file line of row 0 (1, or 2 after a header).
    """
    keys = pa.array(list(mapping))
    idx = pc.index_in(col, value_set=keys)
    if idx.null_count:
        bad = pc.unique(col.filter(pc.is_null(idx))).slice(0, 5).to_pylist()
        raise SchemaError(f"{file}: column '{column}' has {idx.null_count} unknown value(s) {bad} (first at line "
                          f"{first_row(pc.is_null(idx)) + line_offset}); allowed: {list(mapping)}")
    return pa.array(list(mapping.values())).take(idx.combine_chunks())


def _prefixed(col: pa.ChunkedArray | pa.Array, prefix: str) -> pa.ChunkedArray:
    return pc.binary_join_element_wise(prefix, pc.cast(col, pa.string()), "")


def _check_not_null(table: pa.Table, file: Path, columns: tuple[str, ...], line_offset: int) -> None:
    for c in columns:
        if table[c].null_count:
            raise SchemaError(f"{file}: column '{c}' has {table[c].null_count} empty value(s) (first at line "
                              f"{first_row(pc.is_null(table[c])) + line_offset})")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _shop_from_log(user: pa.ChunkedArray, item: pa.ChunkedArray, t_ms: np.ndarray, action: pa.Array,
                   item_category: dict[str, pa.Array] | None, file: Path, source: str) -> Shop:
    """Builds catalog, users and events from an interaction log (ids already prefixed, times in ms).

    Args:
        item_category: {"item": item ids, "category": their categories} or None (every category "unknown").
    """
    order = np.argsort(t_ms, kind="stable")  # events sorted by time; stable keeps file order among equal times
    t_ms = t_ms[order]
    take = pa.array(order)
    user, item, action = user.take(take), item.take(take), action.take(take)
    # created_at = first time seen: after the time sort, an item's first row is its first appearance.
    item_codes = pc.dictionary_encode(item.combine_chunks() if isinstance(item, pa.ChunkedArray) else item)
    ids = item_codes.dictionary
    first_row = np.unique(item_codes.indices.to_numpy(), return_index=True)[1]
    categories = pa.repeat(UNKNOWN, len(ids))
    if item_category is not None:
        pos = pc.index_in(ids, value_set=item_category["item"])
        categories = pc.if_else(pc.is_null(pos), UNKNOWN, item_category["category"].take(pos))
    n = len(t_ms)
    catalog = pa.table({"item_id": ids, "brand": pa.repeat(UNKNOWN, len(ids)), "category": categories,
                        "price": pa.array(np.zeros(len(ids))),
                        "created_at": pa.array(t_ms[first_row], type=TIMESTAMP),
                        "attributes": pa.nulls(len(ids), pa.map_(pa.string(), pa.string()))})
    user_ids = pc.unique(user)
    users = pa.table({"user_id": user_ids, "country": pa.repeat(UNKNOWN, len(user_ids)),
                      "device": pa.repeat(UNKNOWN, len(user_ids))})
    events = pa.table({"user_id": user, "item_id": item, "timestamp": pa.array(t_ms, type=TIMESTAMP),
                       "action": action, "position": pa.nulls(n, pa.int32()),
                       "country": pa.repeat(UNKNOWN, n), "device": pa.repeat(UNKNOWN, n),
                       "page": pa.nulls(n, pa.string()), "query": pa.nulls(n, pa.string())})
    meta = {"source": source, "n_events": n, "start_time": _iso(int(t_ms[0])), "end_time": _iso(int(t_ms[-1]))}
    return Shop(catalog=validate_table(catalog, CATALOG_SCHEMA, f"{file} (catalog)"),
                users=validate_table(users, USERS_SCHEMA, f"{file} (users)"),
                events=validate_table(events, EVENTS_SCHEMA, str(file)), meta=meta)


def load_taobao(path: str | Path) -> Shop:
    """Taobao UserBehavior CSV (or a folder holding ``UserBehavior.csv``) as a Shop; mapping in the module docstring.

    Raises:
        SchemaError: the file is missing, a value does not parse, a column is empty, or a behaviour is unknown.
    """
    file = _find_file(Path(path), "UserBehavior.csv")
    types = {"user_id": pa.int64(), "item_id": pa.int64(), "category_id": pa.int64(), "behavior_type": pa.string(),
             "timestamp": pa.int64()}
    raw = _read_csv(file, TAOBAO_COLUMNS, types, header=False)
    _check_not_null(raw, file, TAOBAO_COLUMNS, line_offset=1)
    if raw.num_rows == 0:
        raise SchemaError(f"{file}: no rows")
    action = _map_actions(raw["behavior_type"], TAOBAO_ACTIONS, file, "behavior_type", line_offset=1)
    item = _prefixed(raw["item_id"], "i")
    # An item keeps the category of its first row (Taobao gives each item one category; the first is stable).
    first = np.unique(raw["item_id"].to_numpy(), return_index=True)[1]
    categories = {"item": item.take(pa.array(first)).combine_chunks(),
                  "category": _prefixed(raw["category_id"], "c").take(pa.array(first)).combine_chunks()}
    return _shop_from_log(_prefixed(raw["user_id"], "u"), item, raw["timestamp"].to_numpy() * 1000, action,
                          categories, file, "taobao")


def _retailrocket_categories(folder: Path) -> dict[str, pa.Array] | None:
    """Latest ``categoryid`` per item from ``item_properties*.csv`` (RetailRocket), or None when there is none."""
    files = sorted(folder.glob("item_properties*.csv"))
    if not files:
        return None
    names = ("timestamp", "itemid", "property", "value")
    types = {"timestamp": pa.int64(), "itemid": pa.int64(), "property": pa.string(), "value": pa.string()}
    parts = []
    for f in files:
        t = _read_csv(f, names, types, header=True)
        _check_not_null(t, f, names, line_offset=2)
        parts.append(t.filter(pc.equal(t["property"], "categoryid")).select(["timestamp", "itemid", "value"]))
    props = pa.concat_tables(parts).sort_by([("itemid", "ascending"), ("timestamp", "ascending")])
    item = props["itemid"].to_numpy()
    last = np.flatnonzero(np.r_[item[1:] != item[:-1], True]) if len(item) else np.zeros(0, dtype=np.int64)
    take = pa.array(last, type=pa.int64())
    return {"item": _prefixed(props["itemid"], "i").take(take).combine_chunks(),
            "category": _prefixed(props["value"], "c").take(take).combine_chunks()}


def load_retailrocket(path: str | Path) -> Shop:
    """RetailRocket ``events.csv`` (a file, or the folder holding it) as a Shop; mapping in the module docstring.

    Raises:
        SchemaError: the file is missing, a value does not parse, a column is empty, or an event type is unknown.
    """
    path = Path(path)
    file = _find_file(path, "events.csv")
    types = {"timestamp": pa.int64(), "visitorid": pa.int64(), "event": pa.string(), "itemid": pa.int64(),
             "transactionid": pa.string()}
    raw = _read_csv(file, RETAILROCKET_COLUMNS, types, header=True)
    _check_not_null(raw, file, ("timestamp", "visitorid", "event", "itemid"), line_offset=2)
    if raw.num_rows == 0:
        raise SchemaError(f"{file}: no rows")
    action = _map_actions(raw["event"], RETAILROCKET_ACTIONS, file, "event", line_offset=2)
    return _shop_from_log(_prefixed(raw["visitorid"], "u"), _prefixed(raw["itemid"], "i"),
                          raw["timestamp"].to_numpy(), action, _retailrocket_categories(file.parent), file,
                          "retailrocket")


def _check_references(events: pa.Table, table: pa.Table, column: str, file: Path, other: str) -> None:
    missing = pc.invert(pc.is_in(events[column], value_set=table[column].combine_chunks()))
    n_missing = pc.sum(missing).as_py() or 0
    if n_missing:
        row = first_row(missing)
        raise SchemaError(f"{file}: column '{column}' has {n_missing} value(s) not in {other}, first at row "
                          f"{row + 1}, value {events[column][row].as_py()!r}")


def load_parquet_folder(path: str | Path) -> Shop:
    """A folder of project-schema Parquet files: events.parquet, catalog.parquet and optionally users.parquet.

    Without users.parquet every user of the events is taken, with the country and device of their first event.

    Raises:
        SchemaError: a file is missing or violates its schema, or events reference items or users not listed.
    """
    folder = Path(path)
    catalog = read_table(folder / "catalog.parquet", CATALOG_SCHEMA)
    events_file = folder / "events.parquet"
    events = read_table(events_file, EVENTS_SCHEMA)
    _check_references(events, catalog, "item_id", events_file, "catalog.parquet")  # before the sort: file rows
    users = None
    if (folder / "users.parquet").is_file():
        users = read_table(folder / "users.parquet", USERS_SCHEMA)
        _check_references(events, users, "user_id", events_file, "users.parquet")
    events = events.take(pc.sort_indices(events, sort_keys=[("timestamp", "ascending")]))
    if users is None:
        users = _users_from_events(events, events_file)
    meta = read_meta(folder / "shop.json")
    return Shop(catalog=catalog, users=users, events=events, meta={"source": "parquet", **meta})


def _users_from_events(events: pa.Table, file: Path) -> pa.Table:
    codes = pc.dictionary_encode(events["user_id"].combine_chunks())  # dictionary = users in order of appearance
    first = np.unique(codes.indices.to_numpy(), return_index=True)[1]  # each user's first event, in that order
    take = pa.array(first, type=pa.int64())
    users = pa.table({"user_id": codes.dictionary,
                      "country": pc.fill_null(events["country"].take(take), UNKNOWN),
                      "device": pc.fill_null(events["device"].take(take), UNKNOWN)})
    return validate_table(users, USERS_SCHEMA, f"{file} (users derived from events)")
