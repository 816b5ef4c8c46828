"""MovieLens 100K and 1M folders load into a valid Shop with the documented mapping; a bad line is refused with an
error naming the file, the line and the column."""

import re
from datetime import datetime, timezone
from pathlib import Path

import pytest

from training.data.movielens import load_movielens
from training.data.schemas import CATALOG_SCHEMA, EVENTS_SCHEMA, USERS_SCHEMA, read_shop, write_shop

# Genre flags in the 100K order: unknown, Action, Adventure, Animation, Children's, Comedy, ...
TOY_STORY_FLAGS = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation first
NO_GENRE_FLAGS = "|".join(["0"] * 19)


def write_100k(folder: Path, ratings: str | None = None, users: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{TOY_STORY_FLAGS}\n"
            f"2|Caf\xe9 Noir|15-Mar-1987||http://y|0|1|{'|'.join(['0'] * 17)}\n"  # latin-1 title, year from release
            f"3|unknown|||http://z|{NO_GENRE_FLAGS}\n"
        ).encode("latin-1")
    )
    (folder / "u.data").write_text(ratings or "1\t1\t5\t881250949\n2\t2\t3\t881250000\n1\t3\t1\t881251000\n"
                                   "2\t1\t4\t881252000\n")
    if users:
        (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n")
    return folder


def write_1m(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "movies.dat").write_bytes(
        "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Heat (1995)::Action|Crime|Thriller\n"
        "3::City of Lost Children, The::Adventure|Sci-Fi\n".encode("latin-1")
    )
    (folder / "ratings.dat").write_text(ratings or "1::1::5::978300760\n1::2::2::978302109\n2::3::4::978301968\n")
    return folder


def by_id(table, key: str) -> dict:
    return {row[key]: row for row in table.to_pylist()}


def test_100k_maps_ids_genres_decades_and_titles(tmp_path) -> None:
    shop = load_movielens(write_100k(tmp_path))
    items = by_id(shop.catalog, "item_id")
    assert set(items) == {"m1", "m2", "m3"}
    assert (items["m1"]["category"], items["m1"]["brand"]) == ("Animation", "1990s")
    assert (items["m2"]["category"], items["m2"]["brand"]) == ("Action", "1980s")  # decade from the release date
    assert (items["m3"]["category"], items["m3"]["brand"]) == ("unknown", "unknown")
    assert dict(items["m2"]["attributes"]) == {"title": "Caf\xe9 Noir"}
    assert items["m1"]["price"] == 0.0
    assert items["m1"]["created_at"] == datetime(1995, 1, 1, tzinfo=timezone.utc)
    # No release date: created at the item's first rating.
    assert items["m3"]["created_at"] == datetime.fromtimestamp(881251000, tz=timezone.utc)
    assert shop.meta["source"] == "movielens" and shop.meta["format"] == "100k"


def test_ratings_become_actions_in_time_order(tmp_path) -> None:
    shop = load_movielens(write_100k(tmp_path))
    ev = shop.events.to_pylist()
    assert [(e["user_id"], e["item_id"], e["action"]) for e in ev] == [
        ("u2", "m2", "click"), ("u1", "m1", "purchase"), ("u1", "m3", "view"), ("u2", "m1", "add_to_cart")
    ]
    first = ev[0]
    assert first["position"] is None and first["query"] is None
    assert (first["country"], first["device"], first["page"]) == ("unknown", "unknown", "home")
    assert shop.meta["end_time"] == "1997-12-04T16:13:20Z"  # 881252000


def test_loaded_tables_follow_the_schemas_and_round_trip(tmp_path) -> None:
    shop = load_movielens(write_100k(tmp_path / "ml"))
    assert shop.catalog.schema.equals(CATALOG_SCHEMA) and shop.users.schema.equals(USERS_SCHEMA)
    assert shop.events.schema.equals(EVENTS_SCHEMA)
    write_shop(shop, tmp_path / "shop")
    assert read_shop(tmp_path / "shop").events.equals(shop.events)


def test_users_file_adds_users_without_ratings(tmp_path) -> None:
    with_file = load_movielens(write_100k(tmp_path / "a"))
    without = load_movielens(write_100k(tmp_path / "b", users=False))
    assert with_file.users["user_id"].to_pylist() == ["u1", "u2", "u3"]
    assert without.users["user_id"].to_pylist() == ["u1", "u2"]
    assert set(with_file.users["country"].to_pylist()) == {"unknown"}


def test_1m_maps_first_genre_and_title_year(tmp_path) -> None:
    shop = load_movielens(write_1m(tmp_path))
    items = by_id(shop.catalog, "item_id")
    assert (items["m2"]["category"], items["m2"]["brand"]) == ("Action", "1990s")
    assert items["m2"]["created_at"] == datetime(1995, 1, 1, tzinfo=timezone.utc)
    assert (items["m3"]["category"], items["m3"]["brand"]) == ("Adventure", "unknown")
    assert items["m3"]["created_at"] == datetime.fromtimestamp(978301968, tz=timezone.utc)
    assert [e["action"] for e in shop.events.to_pylist()] == ["purchase", "add_to_cart", "view"]
    assert shop.meta["format"] == "1m"


def test_ml_subfolder_is_found(tmp_path) -> None:
    write_1m(tmp_path / "ml-1m")
    assert load_movielens(tmp_path).meta["format"] == "1m"


def test_malformed_rating_line_names_file_and_line(tmp_path) -> None:
    write_100k(tmp_path, ratings="1\t1\t5\t881250949\n1\t2\tfive\t881250950\n")
    with pytest.raises(ValueError, match=r"u.data: line 2"):
        load_movielens(tmp_path)


def test_rating_outside_one_to_five_is_rejected(tmp_path) -> None:
    write_1m(tmp_path, ratings="1::1::5::978300760\n1::2::2::978302109\n1::3::9::978302110\n")
    with pytest.raises(ValueError, match=r"ratings.dat: line 3, column 'Rating': rating 9"):
        load_movielens(tmp_path)


def test_malformed_movie_line_names_file_and_line(tmp_path) -> None:
    write_1m(tmp_path)
    (tmp_path / "movies.dat").write_text("1::Toy Story (1995)::Animation\nnot a movie\n")
    with pytest.raises(ValueError, match=r"movies.dat: line 2"):
        load_movielens(tmp_path)


def test_rating_of_unknown_movie_is_rejected(tmp_path) -> None:
    write_1m(tmp_path, ratings="1::1::5::978300760\n1::99::2::978302109\n")
    with pytest.raises(ValueError, match=r"ratings.dat: line 2, column 'MovieID': 1 rated .* not in movies.dat, "
                                         r"e.g. 99"):
        load_movielens(tmp_path)


def test_empty_folder_names_the_files_it_looked_for(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"u.data.*ratings.dat"):
        load_movielens(tmp_path)


def test_missing_movies_file_is_named(tmp_path) -> None:
    (tmp_path / "ratings.dat").write_text("1::1::5::978300760\n")
    with pytest.raises(FileNotFoundError, match="movies.dat"):
        load_movielens(tmp_path)


ITEMS_100K = (f"1|Toy Story (1995)|01-Jan-1995||http://x|{TOY_STORY_FLAGS}\n"
              f"2|Heat (1995)|15-Dec-1995||http://y|{NO_GENRE_FLAGS}\n")


@pytest.mark.parametrize(("write", "file", "text", "column", "line"), [
    pytest.param(write_100k, "u.data", "1\t1\t5\t881250949\n2\t2\t3\t881250000\n1\t3\t1\t881251000\n2\t1\t4",
                 "timestamp", 4, id="100k truncated ratings"),
    pytest.param(write_100k, "u.data", "1\t1\t5\t881250949\n1\t2\tfive\t881250950\n", "rating", 2,
                 id="100k text rating"),
    pytest.param(write_100k, "u.data", "1\t1\t5\t881250949\n\n1\t2\t3\t881250950\t7\n", "timestamp", 3,
                 id="100k extra field after a blank line"),
    pytest.param(write_100k, "u.item", ITEMS_100K + "3|unknown|||http://z|0|0", "Adventure", 3,
                 id="100k truncated movies"),
    pytest.param(write_100k, "u.item", ITEMS_100K.replace("15-Dec-1995", "32-Foo-1995"), "release date", 2,
                 id="100k bad date"),
    pytest.param(write_100k, "u.item", ITEMS_100K.replace("2|Heat", "two|Heat"), "movie id", 2,
                 id="100k text movie id"),
    pytest.param(write_100k, "u.user", "1|24|M|technician|85711\nx|53|F|other|94043\n", "user id", 2,
                 id="100k text user id"),
    pytest.param(write_1m, "ratings.dat", "1::1::5::978300760\n1::2::2::978302109\n2::3::", "Timestamp", 3,
                 id="1m truncated ratings"),
    pytest.param(write_1m, "ratings.dat", "1::1::5::978300760\n1::x::2::978302109\n", "MovieID", 2,
                 id="1m text movie id"),
    pytest.param(write_1m, "ratings.dat", "1::1::5::978300760\n1::2::2.5::978302109\n", "Rating", 2,
                 id="1m fractional rating"),
    pytest.param(write_1m, "movies.dat", "1::Toy Story (1995)::Animation\n2::Heat (1995)", "Genres", 2,
                 id="1m truncated movies"),
    pytest.param(write_1m, "movies.dat", "1::Toy Story (1995)::Animation\n2::Heat::(1995)::Action\n", "Genres", 2,
                 id="1m stray separator"),
    pytest.param(write_1m, "users.dat", "1::F::1::10::48067\nu2::M::56::16::70072\n", "UserID", 2,
                 id="1m text user id"),
])
def test_a_bad_line_names_file_column_and_line(tmp_path, write, file: str, text: str, column: str, line: int) -> None:
    write(tmp_path)
    (tmp_path / file).write_text(text)  # the truncated ones end mid-line, as a file cut off mid-write does
    with pytest.raises(ValueError, match=rf"{re.escape(file)}: line {line}, column '{re.escape(column)}'"):
        load_movielens(tmp_path)
