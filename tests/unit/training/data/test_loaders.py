"""Dataset loaders: each format from small files written here, mapped onto the project schemas; bad files rejected."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
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
