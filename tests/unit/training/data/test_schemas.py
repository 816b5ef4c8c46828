"""Arrow schemas: validation errors name the column and the first bad row, safe casts pass, shop folders round-trip."""

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from training.data.schemas import (
    ACTIONS,
    CATALOG_SCHEMA,
    EVENTS_SCHEMA,
    USERS_SCHEMA,
    SchemaError,
    Shop,
    first_failing_row,
    read_shop,
    read_table,
    snapshot_id,
    validate_table,
    write_shop,
    write_table,
)

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def make_catalog(n: int = 3) -> pa.Table:
    return pa.table({
        "item_id": [f"i{k}" for k in range(n)],
        "brand": ["b0"] * n,
        "category": ["c0"] * n,
        "price": [1.5] * n,
        "created_at": pa.array([T0] * n, type=pa.timestamp("ms", tz="UTC")),
        "attributes": pa.array([[("color", "red")]] * n, type=pa.map_(pa.string(), pa.string())),
    })


def make_users(n: int = 2) -> pa.Table:
    return pa.table({"user_id": [f"u{k}" for k in range(n)], "country": ["DE"] * n, "device": ["app"] * n})


def make_events(users: list[str] | None = None, items: list[str] | None = None) -> pa.Table:
    users = users or ["u0", "u1", "u0"]
    items = items or ["i0", "i1", "i2"]
    n = len(users)
    return pa.table({
        "user_id": users,
        "item_id": items,
        "timestamp": pa.array([T0.replace(second=n - k) for k in range(n)], type=pa.timestamp("ms", tz="UTC")),
        "action": ["view", "click", "purchase"][:n],
        "position": pa.array(list(range(n)), type=pa.int32()),
        "country": ["DE"] * n,
        "device": ["app"] * n,
        "page": ["home"] * n,
        "query": pa.nulls(n, pa.string()),
    })


def test_actions_are_in_funnel_order() -> None:
    assert ACTIONS == ("view", "click", "wishlist", "add_to_cart", "purchase")


def test_validate_returns_exact_schema_and_drops_extra_columns() -> None:
    table = make_users().append_column("age", pa.array([30, 40]))
    out = validate_table(table.select(["device", "age", "country", "user_id"]), USERS_SCHEMA, "users")
    assert out.schema.equals(USERS_SCHEMA)
    assert out["user_id"].to_pylist() == ["u0", "u1"]


def test_missing_column_is_named() -> None:
    with pytest.raises(SchemaError, match=r"users.parquet.*missing column 'device'"):
        validate_table(make_users().drop(["device"]), USERS_SCHEMA, "users.parquet")


def test_uncastable_type_names_column_found_and_expected() -> None:
    table = make_catalog().set_column(3, "price", pa.array(["cheap"] * 3))
    with pytest.raises(SchemaError, match=r"'price'.*string.*expected double \(first at row 1, value 'cheap'\)"):
        validate_table(table, CATALOG_SCHEMA, "catalog")


def test_numbers_are_not_silently_turned_into_ids() -> None:
    table = make_users().set_column(0, "user_id", pa.array([1, 2]))
    with pytest.raises(SchemaError, match="'user_id'"):
        validate_table(table, USERS_SCHEMA, "users")


def test_nulls_in_non_nullable_column_are_counted() -> None:
    table = make_users().set_column(1, "country", pa.array(["DE", None]))
    with pytest.raises(SchemaError, match=r"'country' has 1 null.*first at row 2\)"):
        validate_table(table, USERS_SCHEMA, "users")


def test_nulls_in_nullable_column_are_accepted() -> None:
    events = make_events().set_column(4, "position", pa.nulls(3, pa.int32()))
    assert validate_table(events, EVENTS_SCHEMA, "events")["position"].null_count == 3


def test_unknown_action_lists_values_and_allowed_set() -> None:
    events = make_events().set_column(3, "action", pa.array(["view", "like", "like"]))
    with pytest.raises(SchemaError, match=r"'action' has 2 unknown value\(s\) \['like'\] \(first at row 2, "
                                         r"value 'like'\).*add_to_cart"):
        validate_table(events, EVENTS_SCHEMA, "events")


def test_negative_position_is_rejected() -> None:
    events = make_events().set_column(4, "position", pa.array([0, -1, 2], type=pa.int32()))
    with pytest.raises(SchemaError, match=r"'position' has 1 negative.*row 2, value -1"):
        validate_table(events, EVENTS_SCHEMA, "events")


def test_negative_price_is_rejected() -> None:
    table = make_catalog().set_column(3, "price", pa.array([1.0, -2.0, 3.0]))
    with pytest.raises(SchemaError, match=r"'price'.*row 2, value -2.0"):
        validate_table(table, CATALOG_SCHEMA, "catalog")


def test_duplicate_item_id_is_rejected() -> None:
    table = make_catalog().set_column(0, "item_id", pa.array(["i0", "i1", "i0"]))
    with pytest.raises(SchemaError, match=r"'item_id' has 1 duplicate.*first repeat at row 3, value 'i0'"):
        validate_table(table, CATALOG_SCHEMA, "catalog")


def test_duplicate_user_id_is_rejected() -> None:
    table = make_users().set_column(0, "user_id", pa.array(["u0", "u0"]))
    with pytest.raises(SchemaError, match="'user_id'"):
        validate_table(table, USERS_SCHEMA, "users")


def test_int64_position_that_fits_is_cast_to_int32() -> None:
    events = make_events().set_column(4, "position", pa.array([0, 1, 2], type=pa.int64()))
    assert validate_table(events, EVENTS_SCHEMA, "events")["position"].type == pa.int32()


def test_int64_position_that_overflows_int32_is_rejected() -> None:
    events = make_events().set_column(4, "position", pa.array([0, 1, 2**40], type=pa.int64()))
    with pytest.raises(SchemaError, match=r"'position'.*int64.*row 3, value 1099511627776"):
        validate_table(events, EVENTS_SCHEMA, "events")


def test_string_variants_and_dictionaries_become_string() -> None:
    users = pa.table({
        "user_id": pa.array(["u0", "u1"], type=pa.large_string()),
        "country": pa.array(["DE", "FR"]).dictionary_encode(),
        "device": ["app", "web"],
    })
    out = validate_table(users, USERS_SCHEMA, "users")
    assert out.schema.equals(USERS_SCHEMA)
    assert out["country"].to_pylist() == ["DE", "FR"]


def test_naive_timestamps_are_taken_as_utc_and_units_normalised() -> None:
    naive_ns = pa.array([np.datetime64("2026-01-01T00:00:01.234567891", "ns")] * 3)
    out = validate_table(make_catalog().set_column(4, "created_at", naive_ns), CATALOG_SCHEMA, "catalog")
    assert out["created_at"].type == pa.timestamp("ms", tz="UTC")
    assert out["created_at"][0].as_py() == datetime(2026, 1, 1, 0, 0, 1, 234000, tzinfo=timezone.utc)


def test_other_timezones_keep_the_same_instant() -> None:
    berlin = pa.array([T0] * 3, type=pa.timestamp("s", tz="Europe/Berlin"))
    out = validate_table(make_catalog().set_column(4, "created_at", berlin), CATALOG_SCHEMA, "catalog")
    assert out["created_at"][0].as_py() == T0


def test_write_then_read_table_round_trips(tmp_path) -> None:
    write_table(make_catalog(), tmp_path / "c.parquet", CATALOG_SCHEMA)
    table = read_table(tmp_path / "c.parquet", CATALOG_SCHEMA)
    assert table.schema.equals(CATALOG_SCHEMA)
    assert table.to_pylist() == make_catalog().to_pylist()


def test_write_table_rejects_invalid_table_and_writes_nothing(tmp_path) -> None:
    with pytest.raises(SchemaError):
        write_table(make_users().drop(["country"]), tmp_path / "u.parquet", USERS_SCHEMA)
    assert not (tmp_path / "u.parquet").exists()


def test_read_table_missing_file_names_path(tmp_path) -> None:
    with pytest.raises(SchemaError, match="nope.parquet"):
        read_table(tmp_path / "nope.parquet", USERS_SCHEMA)


def test_read_table_error_names_the_file(tmp_path) -> None:
    pq.write_table(make_users().drop(["device"]), tmp_path / "users.parquet")
    with pytest.raises(SchemaError, match=r"users.parquet: missing column 'device'"):
        read_table(tmp_path / "users.parquet", USERS_SCHEMA)


def test_read_table_of_a_truncated_file_names_the_file(tmp_path) -> None:
    write_table(make_users(), tmp_path / "users.parquet", USERS_SCHEMA)
    data = (tmp_path / "users.parquet").read_bytes()
    (tmp_path / "users.parquet").write_bytes(data[:-10])  # the footer is cut off
    with pytest.raises(SchemaError, match=r"users.parquet.*truncated or corrupt"):
        read_table(tmp_path / "users.parquet", USERS_SCHEMA)


def test_a_dictionary_column_names_the_row_of_its_value_that_does_not_cast() -> None:
    position = pa.array([0, 1, 2**40], type=pa.int64()).dictionary_encode()
    with pytest.raises(SchemaError, match=r"'position'.*row 3, value 1099511627776"):
        validate_table(make_events().set_column(4, "position", position), EVENTS_SCHEMA, "events")


VALID_INTS = ("0", "7", "-12")


@given(st.lists(st.sampled_from((*VALID_INTS, "x", "", "1.5")), max_size=40))
def test_first_failing_row_is_the_first_value_that_does_not_cast(texts: list[str]) -> None:
    want = next((i for i, t in enumerate(texts) if t not in VALID_INTS), -1)
    assert first_failing_row(pa.array(texts, type=pa.string()), lambda a: a.cast(pa.int64())) == want


def make_shop() -> Shop:
    return Shop(catalog=make_catalog(), users=make_users(), events=make_events(), meta={"source": "test"},
                hidden={"item_latent": np.arange(6, dtype=np.float32).reshape(3, 2)})


def test_shop_round_trips_with_events_sorted_by_time(tmp_path) -> None:
    write_shop(make_shop(), tmp_path)
    shop = read_shop(tmp_path)
    assert shop.catalog.to_pylist() == make_catalog().to_pylist()
    assert shop.users.to_pylist() == make_users().to_pylist()
    ts = shop.events["timestamp"].to_pylist()
    assert ts == sorted(ts) and shop.events.num_rows == 3
    assert shop.meta == {"source": "test"}
    np.testing.assert_array_equal(shop.hidden["item_latent"], make_shop().hidden["item_latent"])


def test_read_shop_without_meta_or_hidden_defaults_to_empty(tmp_path) -> None:
    shop = make_shop()
    shop.hidden = {}
    write_shop(shop, tmp_path)
    (tmp_path / "shop.json").unlink()
    loaded = read_shop(tmp_path)
    assert loaded.meta == {} and loaded.hidden == {}


def test_read_shop_rejects_events_of_unknown_items(tmp_path) -> None:
    shop = make_shop()
    shop.events = make_events(items=["i0", "i9", "i8"])
    write_shop(shop, tmp_path)
    with pytest.raises(SchemaError, match=r"'item_id' has 2 event\(s\).*not in the catalog, first at row 2"):
        read_shop(tmp_path)


def test_read_shop_rejects_events_of_unknown_users(tmp_path) -> None:
    shop = make_shop()
    shop.events = make_events(users=["u0", "u7", "u0"])
    write_shop(shop, tmp_path)
    with pytest.raises(SchemaError, match=r"'user_id' has 1 event\(s\).*row 2, value 'u7'"):
        read_shop(tmp_path)


def test_snapshot_id_is_stable_and_changes_with_content(tmp_path) -> None:
    write_shop(make_shop(), tmp_path / "a")
    write_shop(make_shop(), tmp_path / "b")
    sid = snapshot_id(tmp_path / "a")
    assert len(sid) == 16 and sid == snapshot_id(tmp_path / "b")
    changed = make_shop()
    changed.users = make_users(3)
    write_shop(changed, tmp_path / "c")
    assert snapshot_id(tmp_path / "c") != sid


def test_read_shop_rejects_a_truncated_hidden_array_naming_the_file(tmp_path) -> None:
    write_shop(make_shop(), tmp_path)
    data = (tmp_path / "hidden" / "item_latent.npy").read_bytes()
    (tmp_path / "hidden" / "item_latent.npy").write_bytes(data[:-8])
    with pytest.raises(SchemaError, match=r"item_latent.npy.*truncated or corrupt"):
        read_shop(tmp_path)
