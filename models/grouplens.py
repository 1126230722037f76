"""GroupLens' own MovieLens formats, read into a `Dataset`.

- 100K: `u.data`, `u.user`, `u.item`
- 1M / 10M: `ratings.dat`, `users.dat` (1M only), `movies.dat`
- 20M / 25M / latest: `ratings.csv`, `movies.csv`
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.models.data import RATING_COLUMNS, USER_COLUMNS, DataFormatError, Dataset, build_dataset
from slimrec.models.delimited import read_delimited, read_lines, sniff_encoding

RATING_NUMERIC = {"user_id": "int64", "item_id": "int64", "rating": "float32", "timestamp": "int64"}
# u.item's genre flags, in file order (ML-100K README).
GENRES_100K = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
# users.dat occupation codes 0-20 (ML-1M README).
OCCUPATIONS_1M = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
NO_GENRES = "(no genres listed)"


def load_grouplens_100k(path: Path) -> Dataset:
    """ML-100K: `u.data` (tab-separated ratings), `u.user` and `u.item` (`|`-separated)."""
    ratings = read_delimited(path / "u.data", "\t", RATING_COLUMNS, RATING_NUMERIC)
    users = read_delimited(path / "u.user", "|", USER_COLUMNS, {"user_id": "int64", "age": "int32"})
    reject_duplicate_ids(path / "u.user", users["user_id"])
    raw = read_delimited(
        path / "u.item",
        "|",
        ["item_id", "title", "release_date", "video_date", "url", *GENRES_100K],
        {"item_id": "int64", **{genre: "int8" for genre in GENRES_100K}},
    )
    flags = raw[GENRES_100K].to_numpy()
    if not np.isin(flags, (0, 1)).all():
        row = int(np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))[0])
        raise DataFormatError(path / "u.item", row + 1, "genre flags must be 0 or 1")
    released = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce").dt.year
    items = movie_table(path / "u.item", raw["item_id"], raw["title"], genres_from_flags(flags))
    # The release date is more precise than the title's year; fall back to the title.
    items["year"] = released.fillna(items["year"].where(items["year"] >= 0)).fillna(-1).astype("int32")
    return _build(path, ratings, users, items)


def load_grouplens_dat(path: Path) -> Dataset:
    """ML-1M / ML-10M: `::`-separated `ratings.dat`, `movies.dat`, and `users.dat` (1M only)."""
    ratings = read_delimited(path / "ratings.dat", "::", RATING_COLUMNS, RATING_NUMERIC)
    users = read_users_dat(path / "users.dat") if (path / "users.dat").exists() else None
    items = read_movies_dat(path / "movies.dat")
    return _build(path, ratings, users, items)


def load_grouplens_csv(path: Path) -> Dataset:
    """ML-20M / 25M / latest: `ratings.csv` and `movies.csv`, each with a header line."""
    ratings_path = path / "ratings.csv"
    check_header(ratings_path, ["userId", "movieId", "rating", "timestamp"])
    ratings = read_delimited(ratings_path, ",", RATING_COLUMNS, RATING_NUMERIC, 1, "utf-8")
    return _build(path, ratings, None, read_movies_csv(path / "movies.csv"))


def read_users_dat(path: Path) -> pd.DataFrame:
    raw = read_delimited(
        path,
        "::",
        ["user_id", "gender", "age", "occupation", "zip_code"],
        {"user_id": "int64", "age": "int32", "occupation": "int64"},
    )
    reject_duplicate_ids(path, raw["user_id"])
    code = raw["occupation"].to_numpy()
    bad = (code < 0) | (code >= len(OCCUPATIONS_1M))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, row + 1, f"occupation code {code[row]} is not in 0-20")
    raw["occupation"] = np.asarray(OCCUPATIONS_1M, dtype=object)[code]
    return raw[USER_COLUMNS]


def read_movies_dat(path: Path) -> pd.DataFrame:
    """MovieID::Title (Year)::Genres; titles may hold ':' (even '::'), so split from both ends."""
    lines = read_lines(path, sniff_encoding(path))
    ids, titles, genres = [], [], []
    for number, line in enumerate(lines, 1):
        movie_id, sep, rest = line.partition("::")
        title, sep2, genre = rest.rpartition("::")
        if not (sep and sep2):
            raise DataFormatError(path, number, "expected 3 fields separated by '::'")
        ids.append(movie_id)
        titles.append(title)
        genres.append(genre)
    return movie_table(path, pd.Series(ids), pd.Series(titles), pd.Series(genres))


def read_movies_csv(path: Path) -> pd.DataFrame:
    """movieId,title,genres with quoted titles (commas inside); GroupLens writes utf-8."""
    check_header(path, ["movieId", "title", "genres"])
    rows, done = [], 0
    reader = csv.reader(read_lines(path, "utf-8")[1:], strict=True)
    try:
        for row in reader:
            if reader.line_num != done + 1:  # MovieLens never breaks a line inside quotes
                raise DataFormatError(path, done + 2, "quoted field runs past the end of the line")
            rows.append(row)
            done = reader.line_num
    except csv.Error as exc:
        raise DataFormatError(path, done + 2, f"bad quoting: {exc}") from None
    if not rows:
        raise DataFormatError(path, None, "no data rows")
    for number, row in enumerate(rows, 2):
        if len(row) != 3:
            raise DataFormatError(path, number, f"expected 3 fields separated by ',', found {len(row)}")
    ids, titles, genres = (pd.Series(column) for column in zip(*rows, strict=True))
    return movie_table(path, ids, titles, genres, first_line=2)


def movie_table(
    path: Path, ids: pd.Series, titles: pd.Series, genres: pd.Series, first_line: int = 1
) -> pd.DataFrame:
    """Items table from raw columns: numeric unique ids, the title's "(YYYY)" split off."""
    numbers = pd.to_numeric(ids, errors="coerce")
    bad = (numbers.isna() | (numbers != numbers.round())).to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataFormatError(path, first_line + row, f"movie id is not a whole number: {ids.iloc[row]!r}")
    reject_duplicate_ids(path, numbers.astype("int64"), first_line)
    parts = titles.str.strip().str.extract(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)$")
    return pd.DataFrame(
        {
            "item_id": numbers.astype("int64").to_numpy(),
            "title": parts["title"].fillna(titles.str.strip()).to_numpy(object),
            "genres": genres.replace(NO_GENRES, "").to_numpy(object),
            "year": pd.to_numeric(parts["year"]).fillna(-1).astype("int32").to_numpy(),
        }
    )


def genres_from_flags(flags: np.ndarray) -> pd.Series:
    """ "|"-joined names of the set flags, "unknown" left out."""
    names = GENRES_100K[1:]
    return pd.Series(["|".join(n for n, f in zip(names, row, strict=True) if f) for row in flags[:, 1:]])


def reject_duplicate_ids(path: Path, ids: pd.Series, first_line: int = 1) -> None:
    dup = ids.duplicated().to_numpy()
    if dup.any():
        row = int(np.flatnonzero(dup)[0])
        first = int(np.flatnonzero((ids == ids.iloc[row]).to_numpy())[0])
        raise DataFormatError(
            path,
            first_line + row,
            f"duplicate id {str(ids.iloc[row])!r} (first on line {first_line + first})",
        )


def check_header(path: Path, expected: list[str]) -> None:
    first = [line.lstrip("\ufeff") for line in read_lines(path, "utf-8", limit=1)]
    if not first or first[0].split(",") != expected:
        found = first[0] if first else ""
        raise DataFormatError(path, 1, f"expected header {','.join(expected)!r}, found {found!r}")


def _build(path: Path, ratings: pd.DataFrame, users, items) -> Dataset:
    # build_dataset wants string ids; spelling each distinct id once (not once per row) makes
    # a 25M-row load ~3x faster.
    for column in ("user_id", "item_id"):
        codes, uniques = pd.factorize(ratings[column])
        ratings[column] = pd.Categorical.from_codes(codes, np.asarray(uniques).astype(str))
    return build_dataset(path.resolve().name, ratings, users, items)
