"""MovieLens 100K and 1M as a `Shop`, so the pipeline can run on public data as well as on the synthetic shop.

Layouts (detected from the files present in `path`, or in its `ml-100k` / `ml-1m` subfolder):

- 100K: ``u.data`` (tab-separated ``user item rating unix_ts``), ``u.item`` (pipe-separated, latin-1:
  ``id|title|release date|video release date|url|19 genre flags`` in the order of `GENRES_100K`), optional ``u.user``
  (``id|age|gender|occupation|zip``).
- 1M: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``), ``movies.dat`` (``MovieID::Title::Genres`` with
  ``|``-separated genres, latin-1), optional ``users.dat`` (``UserID::Gender::Age::Occupation::Zip``).

Mapping onto the shop schemas:

- item_id ``"m<id>"``, user_id ``"u<id>"``.
- category = the movie's first genre (``"unknown"`` when it has none).
- brand = release decade, e.g. ``"1990s"``, from the year in the title ``"(1995)"`` or else the 100K release date;
  ``"unknown"`` when neither gives a year. Decades play the role brands play in a shop: a taste axis across categories.
- price 0.0 (films have no price here); attributes ``{"title": title}``.
- created_at = the release date when known (100K: the release-date column; 1M: only the title's year is known, so
  1 January of that year), else the time of the item's first rating.
- ratings become actions, so the funnel carries the strength of a preference: 1-2 -> view, 3 -> click,
  4 -> add_to_cart, 5 -> purchase. position is null (MovieLens logs no display slot), country and device
  ``"unknown"``, page ``"home"``, query null.
- users come from the users file when present, else from the ratings; country and device are ``"unknown"``.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from training.data.schemas import CATALOG_SCHEMA, EVENTS_SCHEMA, TIMESTAMP, USERS_SCHEMA, Shop, validate_table

GENRES_100K: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
RATING_ACTIONS: dict[int, str] = {1: "view", 2: "view", 3: "click", 4: "add_to_cart", 5: "purchase"}
# Column names as the MovieLens READMEs give them, so an error points at the documented field.
RATING_COLUMNS = {"100k": ("user id", "item id", "rating", "timestamp"),
                  "1m": ("UserID", "MovieID", "Rating", "Timestamp")}
ITEM_COLUMNS_100K = ("movie id", "movie title", "release date", "video release date", "IMDb URL", *GENRES_100K)
ITEM_COLUMNS_1M = ("MovieID", "Title", "Genres")
USER_ID_COLUMN = {"100k": "user id", "1m": "UserID"}
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")

_Movie = tuple[str, str, str, int | None]  # title, category, brand, release time in ms (None if unknown)


def _decade(year: int | None) -> str:
    return "unknown" if year is None else f"{year // 10 * 10}s"


def _title_year(title: str) -> int | None:
    match = _TITLE_YEAR.search(title)
    return int(match.group(1)) if match else None


def _ms(dt: datetime) -> int:
    return int(dt.replace(tzinfo=timezone.utc).timestamp() * 1000)


def _read_lines(path: Path) -> list[tuple[int, str]]:
    # latin-1 decodes any byte, which is what MovieLens titles need; blank lines (e.g. a trailing one) are skipped.
    text = path.read_text(encoding="latin-1")
    return [(no, line) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]


def _bad_line(path: Path, no: int, line: str, column: str, problem: str) -> ValueError:
    return ValueError(f"{path}: line {no}, column '{column}': {problem}: {line!r}")


def _split(path: Path, no: int, line: str, sep: str | None, columns: tuple[str, ...]) -> list[str]:
    """The fields of one line; a wrong count (a truncated line, a stray separator) names the first missing column."""
    parts = line.split(sep)
    if len(parts) < len(columns):
        raise _bad_line(path, no, line, columns[len(parts)],
                        f"expected {len(columns)} fields, found {len(parts)} (missing; a truncated or malformed line)")
    if len(parts) > len(columns):
        raise _bad_line(path, no, line, columns[-1], f"expected {len(columns)} fields, found {len(parts)} "
                        "(extra fields after it)")
    return parts


def _int(path: Path, no: int, line: str, column: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_line(path, no, line, column, f"{text!r} is not an integer") from None


def _parse_ratings(path: Path, sep: str | None,
                   columns: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Returns (user, item, rating, timestamp_s, line number) int64 arrays; `sep=None` splits on whitespace (the 100K
    tab file)."""
    rows = []
    for no, line in _read_lines(path):
        row = tuple(_int(path, no, line, c, p) for c, p in zip(columns, _split(path, no, line, sep, columns)))
        if row[2] not in RATING_ACTIONS:
            raise _bad_line(path, no, line, columns[2], f"rating {row[2]} outside 1..5")
        rows.append((*row, no))
    if not rows:
        raise ValueError(f"{path}: no ratings")
    user, item, rating, ts, line_no = np.array(rows, dtype=np.int64).T
    return user, item, rating, ts, line_no


def _parse_items_100k(path: Path) -> dict[int, _Movie]:
    movies = {}
    for no, line in _read_lines(path):
        parts = _split(path, no, line, "|", ITEM_COLUMNS_100K)
        movie_id, title, release = _int(path, no, line, "movie id", parts[0]), parts[1], parts[2].strip()
        flags = [_int(path, no, line, g, f) for g, f in zip(GENRES_100K, parts[5:])]
        try:
            released = datetime.strptime(release, "%d-%b-%Y") if release else None
        except ValueError:
            raise _bad_line(path, no, line, "release date", f"{release!r} is not a date like 01-Jan-1995") from None
        genres = [g for g, flag in zip(GENRES_100K, flags) if flag]
        year = _title_year(title) or (released.year if released else None)
        movies[movie_id] = (title, genres[0] if genres else "unknown", _decade(year), _ms(released) if released else None)
    return movies


def _parse_items_1m(path: Path) -> dict[int, _Movie]:
    movies = {}
    for no, line in _read_lines(path):
        parts = _split(path, no, line, "::", ITEM_COLUMNS_1M)
        movie_id, title, genres = _int(path, no, line, "MovieID", parts[0]), parts[1], parts[2].strip()
        year = _title_year(title)
        category = genres.split("|")[0] if genres and genres != "(no genres listed)" else "unknown"
        movies[movie_id] = (title, category, _decade(year), _ms(datetime(year, 1, 1)) if year else None)
    return movies


def _parse_user_ids(path: Path, sep: str, column: str) -> list[int]:
    return [_int(path, no, line, column, line.split(sep)[0]) for no, line in _read_lines(path)]


def _locate(path: Path) -> tuple[str, Path]:
    for folder in (path, path / "ml-100k", path / "ml-1m"):
        if (folder / "u.data").is_file():
            return "100k", folder
        if (folder / "ratings.dat").is_file():
            return "1m", folder
    raise FileNotFoundError(
        f"{path}: no MovieLens data found; looked for u.data + u.item (100K) or ratings.dat + movies.dat (1M) "
        f"in {path}, {path / 'ml-100k'} and {path / 'ml-1m'}"
    )


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def load_movielens(path: str | Path) -> Shop:
    """Loads MovieLens 100K or 1M from a folder as a validated `Shop` (mapping in the module docstring).

    Args:
        path: the folder holding the MovieLens files (or its parent with an `ml-100k` / `ml-1m` subfolder).

    Returns:
        A Shop with meta {"source": "movielens", "format": "100k"|"1m", "start_time", "end_time", "n_ratings"}.

    Raises:
        FileNotFoundError: neither layout is present, or the movies file is missing.
        ValueError: a malformed or truncated line, or ratings of unknown movies; the message names the file, the line
            number and the column (as the MovieLens README names it).
    """
    fmt, folder = _locate(Path(path))
    ratings_file, items_file, users_file, sep = (
        ("u.data", "u.item", "u.user", "|") if fmt == "100k" else ("ratings.dat", "movies.dat", "users.dat", "::")
    )
    if not (folder / items_file).is_file():
        raise FileNotFoundError(f"{folder}: found {ratings_file} but not {items_file} (MovieLens {fmt} layout)")
    user, item, rating, ts, line_no = _parse_ratings(folder / ratings_file, None if fmt == "100k" else "::",
                                                     RATING_COLUMNS[fmt])
    movies = (_parse_items_100k if fmt == "100k" else _parse_items_1m)(folder / items_file)

    unknown = ~np.isin(item, np.fromiter(movies, dtype=np.int64))
    if unknown.any():
        first = int(np.argmax(unknown))
        raise ValueError(f"{folder / ratings_file}: line {line_no[first]}, column '{RATING_COLUMNS[fmt][1]}': "
                         f"{len(np.unique(item[unknown]))} rated movie id(s) not in {items_file}, e.g. "
                         f"{int(item[first])}")
    ts_ms = ts * 1000
    order = np.argsort(ts_ms, kind="stable")  # stable keeps file order among equal timestamps
    user, item, rating, ts_ms = user[order], item[order], rating[order], ts_ms[order]
    movie_ids = np.array(sorted(movies), dtype=np.int64)
    rated, first = np.unique(item, return_index=True)  # first index in time order = the first rating
    first_rating = dict(zip(rated.tolist(), ts_ms[first].tolist()))
    created = [movies[m][3] if movies[m][3] is not None else first_rating.get(m, int(ts_ms[0]))
               for m in movie_ids.tolist()]
    catalog = pa.table({
        "item_id": [f"m{m}" for m in movie_ids],
        "brand": [movies[m][2] for m in movie_ids],
        "category": [movies[m][1] for m in movie_ids],
        "price": pa.array(np.zeros(len(movie_ids))),
        "created_at": pa.array(created, type=TIMESTAMP),
        "attributes": pa.array([[("title", movies[m][0])] for m in movie_ids], type=pa.map_(pa.string(), pa.string())),
    })

    user_ids = set(user.tolist())
    if (folder / users_file).is_file():
        user_ids |= set(_parse_user_ids(folder / users_file, sep, USER_ID_COLUMN[fmt]))
    user_ids = sorted(user_ids)
    n_users = len(user_ids)
    users = pa.table({"user_id": [f"u{u}" for u in user_ids], "country": ["unknown"] * n_users,
                      "device": ["unknown"] * n_users})

    n = len(ts_ms)
    action_of = np.array(["", *[RATING_ACTIONS[r] for r in range(1, 6)]], dtype=object)
    events = pa.table({
        "user_id": pa.array(np.char.add("u", user.astype(str))),
        "item_id": pa.array(np.char.add("m", item.astype(str))),
        "timestamp": pa.array(ts_ms, type=TIMESTAMP),
        "action": pa.array(action_of[rating], type=pa.string()),
        "position": pa.nulls(n, pa.int32()),
        "country": pa.array(["unknown"] * n),
        "device": pa.array(["unknown"] * n),
        "page": pa.array(["home"] * n),
        "query": pa.nulls(n, pa.string()),
    })
    meta = {"source": "movielens", "format": fmt, "start_time": _iso(int(ts_ms.min())),
            "end_time": _iso(int(ts_ms.max())), "n_ratings": n}
    return Shop(
        catalog=validate_table(catalog, CATALOG_SCHEMA, str(folder / items_file)),
        users=validate_table(users, USERS_SCHEMA, str(folder / users_file)),
        events=validate_table(events, EVENTS_SCHEMA, str(folder / ratings_file)),
        meta=meta,
    )
