"""Every Arrow schema of the project's files, their validation, and the shop folder reader/writer.

One module decides the contracts (STYLE rule 7): the catalog, users, events and candidates tables. Readers
validate against these schemas and reject a bad file with a `SchemaError` that names the file, the column, the
first bad row (1-based, in file order) and the problem, so a broken input fails at the edge instead of deep inside a
training loop.

A shop folder holds one data set::

    DIR/catalog.parquet   CATALOG_SCHEMA
    DIR/users.parquet     USERS_SCHEMA
    DIR/events.parquet    EVENTS_SCHEMA, sorted by timestamp
    DIR/shop.json         meta (source, size, seed, end_time, ...)
    DIR/hidden/<key>.npy  ground truth the models never read (synthetic shops only)
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

# Funnel order; an action's integer id elsewhere is its index here + 1, because 0 is padding.
ACTIONS: tuple[str, ...] = ("view", "click", "wishlist", "add_to_cart", "purchase")

TIMESTAMP = pa.timestamp("ms", tz="UTC")

CATALOG_SCHEMA = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("brand", pa.string(), nullable=False),
        pa.field("category", pa.string(), nullable=False),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("created_at", TIMESTAMP, nullable=False),
        pa.field("attributes", pa.map_(pa.string(), pa.string()), nullable=True),
    ]
)

USERS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("country", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
    ]
)

EVENTS_SCHEMA = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("timestamp", TIMESTAMP, nullable=False),
        pa.field("action", pa.string(), nullable=False),
        pa.field("position", pa.int32(), nullable=True),  # 0-based slot the item was shown at; null if unknown
        pa.field("country", pa.string(), nullable=True),
        pa.field("device", pa.string(), nullable=True),
        pa.field("page", pa.string(), nullable=True),
        pa.field("query", pa.string(), nullable=True),
    ]
)

_SHOP_FILES = (("catalog", CATALOG_SCHEMA), ("users", USERS_SCHEMA), ("events", EVENTS_SCHEMA))
# Beside them, optional: the (condition, user, item) triples of a served log (`training.data.impressions`).
CONDITIONS_FILE = "conditions.parquet"


class SchemaError(ValueError):
    """A table or file does not match its Arrow schema; the message names the table, the column and the problem."""


def _is_stringlike(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _convert(col: pa.ChunkedArray | pa.Array, target: pa.DataType) -> pa.ChunkedArray | pa.Array | None:
    """The cast of one column to `target`, or None when no meaning-keeping cast exists; Arrow raises on a bad value."""
    src = col.type
    if _is_stringlike(target) and _is_stringlike(src):
        return col.cast(target)
    if pa.types.is_integer(target) and pa.types.is_integer(src):
        return col.cast(target, safe=True)  # raises when a value does not fit
    if pa.types.is_floating(target) and (pa.types.is_floating(src) or pa.types.is_integer(src)):
        return col.cast(target, safe=False)  # float64 -> float32 loses precision only, which scores tolerate
    if pa.types.is_timestamp(target) and (pa.types.is_timestamp(src) or pa.types.is_date(src)):
        if pa.types.is_date(src):
            col = col.cast(pa.timestamp("ms"))
        # Naive timestamps are taken as UTC; tz-aware ones are stored as UTC instants already, so a tz change is
        # metadata only. Sub-millisecond digits are dropped on purpose (the contract is millisecond precision).
        col = col.cast(pa.timestamp(col.type.unit, tz="UTC"))
        return col.cast(target, safe=False)
    if pa.types.is_map(target) and pa.types.is_map(src):
        return col.cast(target)
    return None


def first_failing_row(values: pa.Array | pa.ChunkedArray, convert: Callable[[pa.Array], object]) -> int:
    """0-based index of the first value that `convert` (a cast) rejects with an Arrow error, or -1 when none is.

    A cast is element-wise, so halving the failing slice finds the value in about two casts of the column; it runs
    only once a cast has failed, because Arrow's own message names the value but not where it is.
    """
    values = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values

    def fails(part: pa.Array) -> bool:
        try:
            convert(part)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return True
        return False

    if not fails(values):
        return -1
    lo, n = 0, len(values)  # invariant: values[lo:lo + n] holds a failing value
    while n > 1:
        half = n // 2
        if fails(values.slice(lo, half)):
            n = half
        else:
            lo, n = lo + half, n - half
    return lo


def first_row(mask: pa.Array | pa.ChunkedArray) -> int:
    """0-based index of the first true value of a boolean mask (nulls count as false), or -1 when none is true."""
    return pc.index(pc.fill_null(mask, False), True).as_py()


def _at_row(values: pa.Array | pa.ChunkedArray, i: int) -> str:
    return f"row {i + 1}, value {values[i].as_py()!r}"


def _cast_column(col: pa.ChunkedArray, target: pa.DataType, name: str, column: str) -> pa.ChunkedArray:
    """Casts one column to `target`, allowing only casts that keep the meaning (no numbers silently turned into ids).

    Errors name the first offending row (1-based, in file order): the first value that does not cast, or, when the
    whole type is wrong, the first non-null value.
    """
    src = col.type
    if src == target:
        return col
    if pa.types.is_dictionary(src):
        col = pa.chunked_array([c.dictionary_decode() for c in col.chunks], type=src.value_type)
        return _cast_column(col, target, name, column)
    if pa.types.is_null(src):
        # An all-null column has no type of its own; the nullability check decides whether it is acceptable.
        return pa.chunked_array([pa.nulls(len(col), target)], type=target)
    try:
        out = _convert(col, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        bad = max(first_failing_row(col, lambda part: _convert(part, target)), 0)
        raise SchemaError(f"{name}: column '{column}' of type {src} cannot be cast to {target} (first at "
                          f"{_at_row(col, bad)}): {exc}") from exc
    if out is None:
        first = first_row(pc.is_valid(col))  # -1 when every value is null
        where = f" (first at {_at_row(col, first)})" if first >= 0 else ""
        raise SchemaError(f"{name}: column '{column}' has type {src}, expected {target}{where}")
    return out


def _examples(values: pa.Array, limit: int = 5) -> list:
    return values.unique().slice(0, limit).to_pylist()


def _check_unique(table: pa.Table, column: str, name: str) -> None:
    counts = pc.value_counts(table[column])
    dupes = counts.filter(pc.greater(counts.field("counts"), 1))
    if len(dupes):
        codes = pc.dictionary_encode(table[column].combine_chunks()).indices.to_numpy()
        repeated = np.ones(len(codes), dtype=bool)
        repeated[np.unique(codes, return_index=True)[1]] = False  # a value's first row is not a repeat
        raise SchemaError(
            f"{name}: column '{column}' has {len(dupes)} duplicate value(s), first repeat at "
            f"{_at_row(table[column], int(np.flatnonzero(repeated)[0]))}"
        )


def _check_values(table: pa.Table, schema: pa.Schema, name: str) -> None:
    if schema.equals(EVENTS_SCHEMA):
        action = table["action"]
        unknown = pc.invert(pc.is_in(action, value_set=pa.array(ACTIONS)))
        n_unknown = pc.sum(unknown).as_py() or 0
        if n_unknown:
            bad = _examples(action.filter(unknown).combine_chunks())
            raise SchemaError(f"{name}: column 'action' has {n_unknown} unknown value(s) {bad} (first at "
                              f"{_at_row(action, first_row(unknown))}); allowed: {list(ACTIONS)}")
        negative = pc.less(table["position"], 0)
        n_negative = pc.sum(negative).as_py() or 0
        if n_negative:
            raise SchemaError(f"{name}: column 'position' has {n_negative} negative value(s) (first at "
                              f"{_at_row(table['position'], first_row(negative))}); positions are 0-based")
    elif schema.equals(CATALOG_SCHEMA):
        price = table["price"]
        bad = pc.or_(pc.less(price, 0.0), pc.is_nan(price))
        n_bad = pc.sum(bad).as_py() or 0
        if n_bad:
            raise SchemaError(f"{name}: column 'price' has {n_bad} negative or NaN value(s) (first at "
                              f"{_at_row(price, first_row(bad))})")
        _check_unique(table, "item_id", name)
    elif schema.equals(USERS_SCHEMA):
        _check_unique(table, "user_id", name)


def validate_table(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Checks a table against a schema and returns it in the schema's exact shape.

    Args:
        table: the table to check; extra columns are allowed and dropped.
        schema: one of this module's schemas.
        name: what to call the table in errors (usually its file path).

    Returns:
        A table with exactly the schema's columns, in order, cast to the schema's types.

    Raises:
        SchemaError: a column is missing, has a type that cannot be cast safely, holds nulls where the schema forbids
            them, or holds values outside the contract (unknown action, negative position or price, duplicate ids);
            the message names the first offending row.
    """
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            raise SchemaError(f"{name}: missing column '{f.name}' ({f.type}); found columns {table.column_names}")
        col = _cast_column(table[f.name], f.type, name, f.name)
        if not f.nullable and col.null_count:
            raise SchemaError(f"{name}: column '{f.name}' has {col.null_count} null value(s) but is not nullable "
                              f"(first at row {first_row(pc.is_null(col)) + 1})")
        columns.append(col)
    out = pa.Table.from_arrays(columns, schema=schema)
    _check_values(out, schema, name)
    return out


def read_table(path: str | Path, schema: pa.Schema, name: str | None = None) -> pa.Table:
    """Reads one Parquet file and validates it against `schema`.

    Args:
        path: the Parquet file.
        schema: the schema it must follow.
        name: what to call it in errors; the path by default.

    Returns:
        The validated table.

    Raises:
        SchemaError: the file is missing, unreadable, or does not follow the schema.
    """
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise SchemaError(f"{name}: no such file {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:  # a truncated or corrupt file: say which one, not only Arrow's words
        raise SchemaError(f"{name}: cannot read Parquet file {path} (truncated or corrupt?): {exc}") from exc
    return validate_table(table, schema, name)


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema) -> None:
    """Validates a table against `schema` and writes it as Parquet (parent folders are created).

    Raises:
        SchemaError: the table does not follow the schema; nothing is written then.
    """
    path = Path(path)
    table = validate_table(table, schema, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@dataclass
class Shop:
    """One data set: validated tables, JSON-able metadata and (synthetic only) the hidden ground truth.

    Attributes:
        catalog: CATALOG_SCHEMA table.
        users: USERS_SCHEMA table.
        events: EVENTS_SCHEMA table, sorted by timestamp.
        meta: {"source", "size", "seed", "end_time" (ISO-8601 UTC of the last event), ...}.
        hidden: arrays the models never read, rows in the catalog/users order (e.g. "item_latent": (n_items, 16)).
    """

    catalog: pa.Table
    users: pa.Table
    events: pa.Table
    meta: dict
    hidden: dict[str, np.ndarray] = field(default_factory=dict)


def write_shop(shop: Shop, out_dir: str | Path) -> None:
    """Writes a shop folder: the three Parquet files, shop.json and hidden/<key>.npy. A folder's logged condition
    triples (`CONDITIONS_FILE`) belong to the shop written before and are removed."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CONDITIONS_FILE).unlink(missing_ok=True)
    for (stem, schema), table in zip(_SHOP_FILES, (shop.catalog, shop.users, shop.events)):
        write_table(table, out_dir / f"{stem}.parquet", schema)
    (out_dir / "shop.json").write_text(json.dumps(shop.meta, indent=2, sort_keys=True) + "\n")
    if shop.hidden:
        (out_dir / "hidden").mkdir(exist_ok=True)
        for key, array in shop.hidden.items():
            np.save(out_dir / "hidden" / f"{key}.npy", array)


def _check_references(events: pa.Table, table: pa.Table, column: str, name: str, other: str) -> None:
    missing = pc.invert(pc.is_in(events[column], value_set=table[column].combine_chunks()))
    n_missing = pc.sum(missing).as_py() or 0
    if n_missing:
        raise SchemaError(f"{name}: column '{column}' has {n_missing} event(s) whose {column} is not in {other}, "
                          f"first at {_at_row(events[column], first_row(missing))}")


def read_shop(path: str | Path) -> Shop:
    """Reads and validates a shop folder written by `write_shop` (or by hand).

    Events are sorted by timestamp (stable, so an already sorted file keeps its order) and must only reference
    items of the catalog and users of the users table.

    Raises:
        SchemaError: a file is missing or invalid, or events reference unknown items or users.
    """
    path = Path(path)
    catalog, users, events = (read_table(path / f"{stem}.parquet", schema) for stem, schema in _SHOP_FILES)
    events_name = str(path / "events.parquet")
    _check_references(events, catalog, "item_id", events_name, "the catalog")
    _check_references(events, users, "user_id", events_name, "users")
    events = events.take(pc.sort_indices(events, sort_keys=[("timestamp", "ascending")]))
    meta = read_meta(path / "shop.json")
    hidden_dir = path / "hidden"
    hidden = {p.stem: _read_npy(p) for p in sorted(hidden_dir.glob("*.npy"))} if hidden_dir.is_dir() else {}
    return Shop(catalog=catalog, users=users, events=events, meta=meta, hidden=hidden)


def read_meta(path: Path) -> dict:
    """A folder's shop.json, or {} when there is none.

    Raises:
        SchemaError: the file is not a JSON object; the message names the file, line and column.
    """
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SchemaError(f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    if not isinstance(meta, dict):
        raise SchemaError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    return meta


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path)
    except (ValueError, OSError, EOFError) as exc:  # np.load's words for a truncated or foreign file
        raise SchemaError(f"{path}: cannot read .npy file (truncated or corrupt?): {exc}") from exc


def snapshot_id(path: str | Path) -> str:
    """A short, stable content hash of a shop folder: the data snapshot id recorded in model bundles.

    Returns:
        The first 16 hex digits of the sha256 over catalog, users and events Parquet bytes, in that order, and
        the logged condition triples' where the shop has them (they are training data too).
    """
    path = Path(path)
    digest = hashlib.sha256()
    files = [path / f"{stem}.parquet" for stem, _ in _SHOP_FILES]
    for file in files + [f for f in [path / CONDITIONS_FILE] if f.is_file()]:
        if not file.is_file():
            raise SchemaError(f"{path}: no such file {file}")
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def iso_utc_now() -> str:
    """The current time as ISO 8601 UTC to the second ("2026-12-01T21:35:39Z"), as manifests record it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
