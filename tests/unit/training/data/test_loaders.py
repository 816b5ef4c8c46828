"""Dataset loaders: each format from small files written here, mapped onto the project schemas; bad files rejected
with an error naming the file, the column and the line or row of the first bad value."""
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from training.data.features import time_ms
from training.data.loaders import load_dataset
from training.data.schemas import CATALOG_SCHEMA, EVENTS_SCHEMA, USERS_SCHEMA, SchemaError, write_shop, write_table
from training.data.synthetic import generate_shop

TAOBAO_ROWS = [  # user, item, category, behaviour, unix seconds (deliberately not in time order)
    (1, 10, 100, "pv", 1_511_600_000),
    (1, 11, 101, "pv", 1_511_500_000),
    (2, 10, 100, "fav", 1_511_700_000),
    (2, 12, 100, "cart", 1_511_800_000),
    (3, 12, 100, "buy", 1_511_900_000),
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _taobao(tmp_path: Path, rows=TAOBAO_ROWS) -> Path:
    return _write(tmp_path / "UserBehavior.csv", [",".join(str(v) for v in r) for r in rows])


def _assert_schemas(shop) -> None:
    assert shop.catalog.schema.equals(CATALOG_SCHEMA)
    assert shop.users.schema.equals(USERS_SCHEMA)
    assert shop.events.schema.equals(EVENTS_SCHEMA)
    t = time_ms(shop.events["timestamp"])
    assert (np.diff(t) >= 0).all(), "events must be sorted by time"
    assert pc.all(pc.is_in(shop.events["item_id"], value_set=shop.catalog["item_id"].combine_chunks())).as_py()
    assert pc.all(pc.is_in(shop.events["user_id"], value_set=shop.users["user_id"].combine_chunks())).as_py()


def test_taobao_maps_behaviours_categories_and_first_seen_time(tmp_path: Path) -> None:
    shop = load_dataset(_taobao(tmp_path), "taobao")
    _assert_schemas(shop)
    ev = shop.events.to_pydict()
    assert ev["user_id"] == ["u1", "u1", "u2", "u2", "u3"]  # sorted by time: the second row comes first
    assert ev["action"] == ["click", "click", "wishlist", "add_to_cart", "purchase"]
    assert ev["item_id"] == ["i11", "i10", "i10", "i12", "i12"]
    cat = {r["item_id"]: r for r in shop.catalog.to_pylist()}
    assert cat["i10"]["category"] == "c100" and cat["i11"]["category"] == "c101"
    assert cat["i12"]["created_at"].timestamp() == 1_511_800_000  # first time seen
    assert {r["brand"] for r in cat.values()} == {"unknown"} and {r["price"] for r in cat.values()} == {0.0}
    assert shop.meta["source"] == "taobao" and sorted(shop.users["user_id"].to_pylist()) == ["u1", "u2", "u3"]


def test_taobao_folder_is_searched_for_the_csv(tmp_path: Path) -> None:
    _taobao(tmp_path)
    assert load_dataset(tmp_path, "taobao").events.num_rows == len(TAOBAO_ROWS)


def test_taobao_unknown_behaviour_names_file_and_column(tmp_path: Path) -> None:
    path = _taobao(tmp_path, TAOBAO_ROWS + [(4, 13, 100, "like", 1_511_950_000)])
    with pytest.raises(SchemaError, match=r"UserBehavior\.csv.*'behavior_type'.*like"):
        load_dataset(path, "taobao")


def test_taobao_non_numeric_id_names_the_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "UserBehavior.csv", ["1,10,100,pv,1511600000", "x,11,101,pv,1511500000"])
    with pytest.raises(SchemaError, match=r"UserBehavior\.csv: column 'user_id'"):
        load_dataset(path, "taobao")


def test_taobao_missing_field_names_the_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "UserBehavior.csv", ["1,10,100,pv,1511600000", "2,11,,pv,1511500000"])
    with pytest.raises(SchemaError, match="column 'category_id'"):
        load_dataset(path, "taobao")


def _retailrocket(tmp_path: Path, extra: list[str] = ()) -> Path:
    return _write(tmp_path / "events.csv", [
        "timestamp,visitorid,event,itemid,transactionid",
        "1433221332117,257597,view,355908,",
        "1433224214164,992329,view,248676,",
        "1433221999827,111016,addtocart,355908,",
        "1433222276276,257597,transaction,248676,4000",
        *extra,
    ])


def test_retailrocket_maps_events_and_takes_latest_category(tmp_path: Path) -> None:
    _retailrocket(tmp_path)
    _write(tmp_path / "item_properties_part1.csv", [
        "timestamp,itemid,property,value",
        "1431226800000,355908,categoryid,1173",
        "1431226800000,355908,790,n15360.000",
        "1432436400000,355908,categoryid,1200",  # later: wins
    ])
    _write(tmp_path / "item_properties_part2.csv", ["timestamp,itemid,property,value",
                                                    "1431226800000,248676,categoryid,77"])
    shop = load_dataset(tmp_path, "retailrocket")
    _assert_schemas(shop)
    assert shop.events["action"].to_pylist() == ["click", "add_to_cart", "purchase", "click"]
    cat = {r["item_id"]: r["category"] for r in shop.catalog.to_pylist()}
    assert cat == {"i355908": "c1200", "i248676": "c77"}
    assert shop.events["timestamp"][0].as_py().timestamp() == pytest.approx(1433221332.117)


def test_retailrocket_without_properties_has_unknown_categories(tmp_path: Path) -> None:
    shop = load_dataset(_retailrocket(tmp_path), "retailrocket")
    assert set(shop.catalog["category"].to_pylist()) == {"unknown"}


def test_retailrocket_unknown_event_names_the_column(tmp_path: Path) -> None:
    path = _retailrocket(tmp_path, ["1433222276276,1,removefromcart,248676,"])
    with pytest.raises(SchemaError, match=r"events\.csv.*'event'.*removefromcart"):
        load_dataset(path, "retailrocket")


def test_retailrocket_missing_column_is_rejected(tmp_path: Path) -> None:
    path = _write(tmp_path / "events.csv", ["timestamp,visitorid,event,transactionid", "1,2,view,"])
    with pytest.raises(SchemaError, match=r"events\.csv.*itemid"):
        load_dataset(path, "retailrocket")


def _parquet_folder(tmp_path: Path, with_users: bool) -> tuple[Path, object]:
    shop = generate_shop("tiny", 0)
    folder = tmp_path / "pq"
    write_table(shop.events, folder / "events.parquet", EVENTS_SCHEMA)
    write_table(shop.catalog, folder / "catalog.parquet", CATALOG_SCHEMA)
    if with_users:
        write_table(shop.users, folder / "users.parquet", USERS_SCHEMA)
    return folder, shop


def test_parquet_folder_without_users_derives_them_from_events(tmp_path: Path) -> None:
    folder, shop = _parquet_folder(tmp_path, with_users=False)
    loaded = load_dataset(folder, "parquet")
    _assert_schemas(loaded)
    assert loaded.events.num_rows == shop.events.num_rows
    assert set(loaded.users["user_id"].to_pylist()) == set(shop.events["user_id"].to_pylist())


def test_parquet_folder_rejects_unknown_action_naming_the_column(tmp_path: Path) -> None:
    folder, shop = _parquet_folder(tmp_path, with_users=True)
    bad = shop.events.set_column(3, "action", pa.array(["like"] * shop.events.num_rows))
    import pyarrow.parquet as pq

    pq.write_table(bad, folder / "events.parquet")
    with pytest.raises(SchemaError, match=r"events\.parquet: column 'action'"):
        load_dataset(folder, "parquet")


def test_parquet_folder_rejects_events_of_items_missing_from_catalog(tmp_path: Path) -> None:
    folder, shop = _parquet_folder(tmp_path, with_users=True)
    write_table(shop.catalog.slice(0, 10), folder / "catalog.parquet", CATALOG_SCHEMA)
    with pytest.raises(SchemaError, match=r"events\.parquet: column 'item_id'"):
        load_dataset(folder, "parquet")


def test_parquet_folder_missing_catalog_names_the_file(tmp_path: Path) -> None:
    folder, _ = _parquet_folder(tmp_path, with_users=True)
    (folder / "catalog.parquet").unlink()
    with pytest.raises(SchemaError, match=r"catalog\.parquet"):
        load_dataset(folder, "parquet")


def test_synthetic_folder_round_trips(tmp_path: Path) -> None:
    shop = generate_shop("tiny", 1)
    write_shop(shop, tmp_path / "shop")
    loaded = load_dataset(tmp_path / "shop", "synthetic")
    assert loaded.events.equals(shop.events)
    np.testing.assert_array_equal(loaded.hidden["user_n_interests"], shop.hidden["user_n_interests"])


def test_movielens_100k_folder_loads(tmp_path: Path) -> None:
    _write(tmp_path / "u.data", ["1\t1\t5\t881250949", "2\t1\t3\t881250950", "1\t2\t1\t881250951"])
    flags = "|".join(["0", "1"] + ["0"] * 17)
    _write(tmp_path / "u.item", [f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}",
                                 f"2|GoldenEye (1995)|01-Jan-1995||http://x|{flags}"])
    shop = load_dataset(tmp_path, "movielens")
    _assert_schemas(shop)
    assert shop.events["action"].to_pylist() == ["purchase", "click", "view"]


def test_unknown_format_and_missing_path_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="format must be one of"):
        load_dataset(tmp_path, "csv")
    with pytest.raises(SchemaError, match="no such file"):
        load_dataset(tmp_path / "absent.csv", "taobao")


def _replace_line(lines: list[str], no: int, line: str) -> list[str]:
    return lines[:no - 1] + [line] + lines[no:]


def _assert_names(exc: pytest.ExceptionInfo, file: str, column: str | None, where: str | None) -> None:
    msg = str(exc.value)
    assert file in msg, msg
    assert column is None or f"'{column}'" in msg, msg
    assert where is None or re.search(rf"\b{where}\b", msg), msg


TAOBAO_LINES = [",".join(str(v) for v in r) for r in TAOBAO_ROWS]


@pytest.mark.parametrize(("lines", "column", "line"), [
    pytest.param(TAOBAO_LINES + ["3,12,1"], "behavior_type", 6, id="truncated last line"),
    pytest.param(_replace_line(TAOBAO_LINES, 3, "2,10,100,like,1511700000"), "behavior_type", 3,
                 id="unknown behaviour"),
    pytest.param(_replace_line(TAOBAO_LINES, 2, "1,11,101,pv,1511500000,9"), "timestamp", 2, id="extra field"),
    pytest.param(_replace_line(TAOBAO_LINES, 4, "2,12,100,cart,yesterday"), "timestamp", 4, id="text timestamp"),
    pytest.param(_replace_line(TAOBAO_LINES, 5, "3,12,1.5,buy,1511900000"), "category_id", 5, id="float id"),
])
def test_taobao_bad_input_names_file_column_and_line(tmp_path: Path, lines: list[str], column: str,
                                                     line: int) -> None:
    path = tmp_path / "UserBehavior.csv"
    path.write_text("\n".join(lines))  # no final newline: a file cut off mid-write ends mid-line
    with pytest.raises(SchemaError) as exc:
        load_dataset(path, "taobao")
    _assert_names(exc, "UserBehavior.csv", column, f"line {line}")


RETAILROCKET_LINES = ["timestamp,visitorid,event,itemid,transactionid", "1433221332117,257597,view,355908,",
                      "1433224214164,992329,view,248676,", "1433221999827,111016,addtocart,355908,",
                      "1433222276276,257597,transaction,248676,4000"]
PROPERTY_LINES = ["timestamp,itemid,property,value", "1431226800000,355908,categoryid,1173",
                  "1431226800000,248676,categoryid,77"]


@pytest.mark.parametrize(("file", "lines", "column", "line"), [
    pytest.param("events.csv", RETAILROCKET_LINES + ["1433222276276,257597,trans"], "itemid", 6,
                 id="truncated last line"),
    pytest.param("events.csv", _replace_line(RETAILROCKET_LINES, 3, "1433224214164,992329,like,248676,"), "event", 3,
                 id="unknown event"),
    pytest.param("events.csv", _replace_line(RETAILROCKET_LINES, 4, "1433221999827,abc,addtocart,355908,"),
                 "visitorid", 4, id="text visitor id"),
    pytest.param("item_properties_part1.csv", PROPERTY_LINES + ["1431226800000,35"], "property", 4,
                 id="truncated properties"),
    pytest.param("item_properties_part1.csv", _replace_line(PROPERTY_LINES, 3, "1431226800000,x,categoryid,77"),
                 "itemid", 3, id="text item id in properties"),
])
def test_retailrocket_bad_input_names_file_column_and_line(tmp_path: Path, file: str, lines: list[str],
                                                           column: str, line: int) -> None:
    _write(tmp_path / "events.csv", RETAILROCKET_LINES)
    _write(tmp_path / "item_properties_part1.csv", PROPERTY_LINES)
    (tmp_path / file).write_text("\n".join(lines))
    with pytest.raises(SchemaError) as exc:
        load_dataset(tmp_path, "retailrocket")
    _assert_names(exc, file, column, f"line {line}")


@pytest.fixture(scope="module")
def tiny_shop():
    return generate_shop("tiny", 0)


def _with_value(values: list, row: int, value: object) -> list:
    return values[:row - 1] + [value] + values[row:]


BAD_PARQUET = [  # (file stem, column, the column as written from its values, 1-based row of the first bad value)
    pytest.param("events", "action", lambda v: pa.array(_with_value(v, 7, "like")), 7, id="unknown action"),
    pytest.param("events", "item_id", lambda v: pa.array(_with_value(v, 12, None)), 12, id="empty id"),
    pytest.param("events", "user_id", lambda v: pa.array(_with_value(v, 9, "u-nobody")), 9, id="unknown user"),
    pytest.param("events", "position", lambda v: pa.array(_with_value(v, 5, 2**40), type=pa.int64()), 5,
                 id="int64 position too big for int32"),
    pytest.param("catalog", "price", lambda v: pa.array(_with_value([str(p) for p in v], 1, "cheap")), 1,
                 id="price as text"),
]


@pytest.mark.parametrize("fmt", ["synthetic", "parquet"])
@pytest.mark.parametrize(("stem", "column", "rewrite", "row"), BAD_PARQUET)
def test_parquet_bad_value_names_file_column_and_row(tmp_path: Path, tiny_shop, fmt: str, stem: str, column: str,
                                                     rewrite, row: int) -> None:
    write_shop(tiny_shop, tmp_path)
    file = tmp_path / f"{stem}.parquet"
    table = pq.read_table(file)
    values = table[column].to_pylist()
    pq.write_table(table.set_column(table.schema.get_field_index(column), column, rewrite(values)), file)
    with pytest.raises(SchemaError) as exc:
        load_dataset(tmp_path, fmt)
    _assert_names(exc, f"{stem}.parquet", column, f"row {row}")


@pytest.mark.parametrize("fmt", ["synthetic", "parquet"])
@pytest.mark.parametrize("stem", ["events", "catalog", "users"])
def test_truncated_parquet_file_names_the_file(tmp_path: Path, tiny_shop, fmt: str, stem: str) -> None:
    write_shop(tiny_shop, tmp_path)
    data = (tmp_path / f"{stem}.parquet").read_bytes()
    (tmp_path / f"{stem}.parquet").write_bytes(data[:len(data) // 2])
    with pytest.raises(SchemaError, match=rf"{stem}\.parquet.*truncated"):
        load_dataset(tmp_path, fmt)


@pytest.mark.parametrize("fmt", ["synthetic", "parquet"])
def test_truncated_shop_json_names_the_file_and_line(tmp_path: Path, tiny_shop, fmt: str) -> None:
    write_shop(tiny_shop, tmp_path)
    text = (tmp_path / "shop.json").read_text()
    (tmp_path / "shop.json").write_text(text[:len(text) // 2])
    with pytest.raises(SchemaError, match=r"shop\.json: not valid JSON at line \d+"):
        load_dataset(tmp_path, fmt)


def test_parquet_folder_rows_are_rows_of_the_file_not_of_the_time_sorted_events(tmp_path: Path, tiny_shop) -> None:
    write_shop(tiny_shop, tmp_path)
    events = pq.read_table(tmp_path / "events.parquet")
    events = events.take(pa.array(np.arange(events.num_rows)[::-1]))  # latest first: sorting moves every row
    items = _with_value(events["item_id"].to_pylist(), 3, "i-nowhere")
    pq.write_table(events.set_column(1, "item_id", pa.array(items)), tmp_path / "events.parquet")
    with pytest.raises(SchemaError) as exc:
        load_dataset(tmp_path, "parquet")
    _assert_names(exc, "events.parquet", "item_id", "row 3")
