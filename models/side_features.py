"""The one place where a data file's feature columns meet the model's feature slots.

The model has fixed slots (`models.data`): users have age, gender, occupation and a zip code;
items have a title, a genre set (multi-hot, also what the API's genre filters use) and a
year. Loaders hand over typed columns (RecBole types: `token`, `token_seq`, `float`,
`float_seq`) and get back the `users` / `items` tables of `build_dataset`.

Rules, applied in this order, by column name and RecBole type:
  - Users: `age` (numbers), `gender`, `occupation`, `zip_code` (and the aliases in
    USER_SLOTS) fill their slot; occupation and the others are categories whatever their type
    (ML-1M's `occupation:float` codes stay the category "10").
  - Items: a title by name (TITLE_NAMES), a year by name (YEAR_NAMES, numbers); then the
    genre set is the first `token_seq` column left, whatever its name; failing that, a
    `token` column named like a genre (GENRE_NAMES), or else the first `token` column whose
    parts form a smaller vocabulary than its distinct values (some value has two or more
    parts). That last rule reads ML-1M's `genre:token` ("Animation Children's Comedy": 301
    distinct values over 18 genres) as the sequence it is, while a title or a city
    ("San Jose", "San Diego") has more distinct words than values. Both fallbacks are logged.
  - A sequence's parts are split on "|" when any value holds one (MovieLens CSV), else on
    whitespace (RecBole's separator).
  - Numbers: a `float` column's values must be numbers (else DataFormatError naming file and
    line), or empty (unknown, -1); a `token` column in a numeric slot (ML-100K's `age:token`)
    turns what is no number into unknown.
  - Any other column is ignored, with one warning per file naming the columns: the model has
    no slot for it. Missing columns are fine: their slot is unknown.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.models.data import ITEM_COLUMNS, USER_COLUMNS, DataFormatError

log = logging.getLogger("slimrec.models")

KINDS = ("token", "token_seq", "float", "float_seq")
# slot: column names that fill it, first found wins.
USER_SLOTS = {
    "age": ("age",),
    "gender": ("gender", "sex"),
    "occupation": ("occupation", "job"),
    "zip_code": ("zip_code", "zip", "zipcode", "postcode", "postal_code"),
}
TITLE_NAMES = ("movie_title", "title", "name")
YEAR_NAMES = ("release_year", "year")
GENRE_NAMES = ("genre", "genres", "class", "category", "categories")


class IgnoredColumnsWarning(UserWarning):
    """A feature file has columns the model has no slot for."""


@dataclass(frozen=True)
class TypedColumn:
    """One column of a feature file. `values` are text as read (delimited files) or as stored
    (Parquet); `first_line` is the file line of row 0, None where rows have no lines."""

    name: str
    kind: str
    values: pd.Series
    first_line: int | None = 2


def user_features(path: Path, ids: pd.Series, columns: list[TypedColumn]) -> pd.DataFrame:
    """USER_COLUMNS from a user file's id column and feature columns (rules: module docstring)."""
    table = {"user_id": ids.to_numpy(object)}
    used = set()
    for slot, names in USER_SLOTS.items():
        column = _first_named(columns, names)
        if column is None:
            table[slot] = np.full(len(ids), -1 if slot == "age" else "", dtype=object)
            continue
        used.add(column.name)
        table[slot] = whole_numbers(path, column) if slot == "age" else category_text(column.values)
    warn_ignored(path, [c for c in columns if c.name not in used])
    return pd.DataFrame(table)[USER_COLUMNS]


def item_features(path: Path, ids: pd.Series, columns: list[TypedColumn]) -> pd.DataFrame:
    """ITEM_COLUMNS from an item file's id column and feature columns (rules: module docstring)."""
    title = _first_named(columns, TITLE_NAMES)
    year = _first_named(columns, YEAR_NAMES)
    rest = [c for c in columns if c is not title and c is not year]
    genre = genre_column(path, rest)
    n = len(ids)
    table = {
        "item_id": ids.to_numpy(object),
        "title": category_text(title.values) if title else np.full(n, "", dtype=object),
        "genres": token_sets(genre.values) if genre else np.full(n, "", dtype=object),
        "year": whole_numbers(path, year) if year else np.full(n, -1, dtype=np.int64),
    }
    warn_ignored(path, [c for c in rest if c is not genre])
    return pd.DataFrame(table)[ITEM_COLUMNS]


def genre_column(path: Path, columns: list[TypedColumn]) -> TypedColumn | None:
    """The column that becomes the genre set: a token_seq, else a genre-named or genre-like token."""
    declared = next((c for c in columns if c.kind == "token_seq"), None)
    if declared is not None:
        return declared
    tokens = [c for c in columns if c.kind == "token"]
    named = next((c for c in tokens if c.name.lower() in GENRE_NAMES), None)
    chosen = named or next((c for c in tokens if reads_as_sequence(c.values)), None)
    if chosen is not None:
        why = "named like a genre" if named else "its parts form a smaller vocabulary than its values"
        log.info("%s: token column %r read as the genre set (%s)", path, chosen.name, why)
    return chosen


def reads_as_sequence(values: pd.Series) -> bool:
    """Some value has two or more parts, and the parts form a smaller vocabulary than the values."""
    text = values.dropna().astype(str)
    distinct = pd.unique(text)
    parts = pd.Series(distinct).str.split(_separator(text))
    if len(distinct) == 0 or parts.str.len().max() < 2:
        return False
    vocabulary = {p for ps in parts for p in ps if p}
    return len(vocabulary) < len(distinct)


def token_sets(values: pd.Series) -> np.ndarray:
    """Each value's distinct parts, "|"-joined in first-seen order ("" for none); lists too (Parquet)."""
    if values.map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
        lists = values.map(lambda v: [] if v is None else [str(p) for p in v])
    else:
        text = values.fillna("").astype(str)
        lists = text.str.split(_separator(text))
    return lists.map(lambda ps: "|".join(dict.fromkeys(p.strip() for p in ps if p.strip()))).to_numpy(object)


def _separator(text: pd.Series) -> str | None:
    """'|' when any value holds one; None (str.split: any whitespace) otherwise."""
    return "|" if text.str.contains("|", regex=False).any() else None


def whole_numbers(path: Path, column: TypedColumn) -> np.ndarray:
    """int64 values, -1 unknown (empty, missing, or in a `token` column no number); in a `float`
    column a value that is there but no number is an error naming the line."""
    missing = column.values.isna().to_numpy() | column.values.astype(str).str.strip().eq("").to_numpy()
    numbers = pd.to_numeric(column.values.where(~missing), errors="coerce").to_numpy(
        np.float64, na_value=np.nan
    )
    bad = ~np.isfinite(numbers)
    if column.kind.startswith("float") and (bad & ~missing).any():
        row = int(np.flatnonzero(bad & ~missing)[0])
        problem = f"{column.name} is not a number: {column.values.iloc[row]!r}"
        raise DataFormatError.at_row(path, column.first_line, row, problem)
    return np.where(bad, -1, np.round(np.nan_to_num(numbers))).astype(np.int64)


def category_text(values: pd.Series) -> np.ndarray:
    """Text of a category column; numbers keep their spelling (10, not 10.0); missing is ""."""
    if values.dtype.kind == "f":
        whole = values.dropna() == values.dropna().round()
        if whole.all():
            values = values.astype("Int64")
    elif values.dtype.kind in "iub":
        values = values.astype("Int64")
    return values.astype(object).where(values.notna(), "").astype(str).to_numpy(object)


def warn_ignored(path: Path, columns: list[TypedColumn]) -> None:
    if columns:
        names = ", ".join(f"{c.name} ({c.kind})" for c in columns)
        warnings.warn(f"{path}: no model slot for column(s) {names}; ignored", IgnoredColumnsWarning, 2)


def _first_named(columns: list[TypedColumn], names: tuple[str, ...]) -> TypedColumn | None:
    by_name = {c.name.lower(): c for c in columns}
    return next((by_name[n] for n in names if n in by_name), None)
