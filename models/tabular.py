"""Plain tables: `interactions.csv` or `interactions.parquet`, optional `users.*` and `items.*`.

- interactions: `user_id, item_id, timestamp` and optionally `rating` (1.0 where absent:
  implicit feedback). Timestamps are whole numbers (seconds, or any unit as long as the order
  holds) or dates (ISO 8601; read as UTC, in seconds).
- users / items: `user_id` / `item_id` and any feature columns, mapped onto the model's slots
  by `slimrec.models.side_features`. A column is typed by a RecBole-style name where given
  (`genre:token_seq`); else a Parquet list column is `token_seq`, a column of numbers `float`
  (all non-empty values numbers, for CSV), anything else `token`.

CSV: comma-separated with a header line, quoted as spreadsheets and pandas write it, utf-8.
Errors name the file and line (the line count assumes no quoted field spans lines); Parquet
has no lines, so its errors name the row. Parquet needs pyarrow (the `train` extra).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.models.data import DataFormatError, Dataset, build_dataset
from slimrec.models.delimited import check_file, locate_decode_error
from slimrec.models.recbole import reject_empty_ids, require_columns
from slimrec.models.side_features import KINDS, TypedColumn, category_text, item_features, user_features

SUFFIXES = (".csv", ".parquet")


def find_table(path: Path, stem: str) -> Path | None:
    """`path/stem.csv` or `path/stem.parquet`; both at once is ambiguous, an error."""
    found = [path / f"{stem}{suffix}" for suffix in SUFFIXES if (path / f"{stem}{suffix}").is_file()]
    if len(found) > 1:
        raise DataFormatError(path, None, f"both {found[0].name} and {found[1].name}: keep one")
    return found[0] if found else None


def load_tables(path: Path) -> Dataset:
    """The dataset of a directory holding `interactions.csv|parquet` (see the module docstring)."""
    inter = find_table(path, "interactions")
    if inter is None:
        raise DataFormatError(path, None, "no interactions.csv or interactions.parquet")
    frame, first_line = read_table(inter)
    require_columns(inter, list(frame.columns), ["user_id", "item_id", "timestamp"])
    ratings = interactions(inter, frame, first_line)
    users = read_feature_table(find_table(path, "users"), "user_id")
    items = read_feature_table(find_table(path, "items"), "item_id")
    return build_dataset(path.resolve().name, ratings, users, items)


def read_table(path: Path) -> tuple[pd.DataFrame, int | None]:
    """(the table, the line of its first data row: 2 for CSV, None for Parquet)."""
    check_file(path)
    if path.suffix == ".parquet":
        return read_parquet(path), None
    return read_csv(path), 2


def read_csv(path: Path) -> pd.DataFrame:
    """Every field as text ("" where empty or missing); bad quoting or field counts by line."""
    try:
        # header=None: the header line fixes the field count, so a longer first data row is an
        # error too (with a header, pandas would quietly drop its surplus fields).
        raw = pd.read_csv(
            path,
            header=None,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            encoding="utf-8-sig",
            engine="c",
            index_col=False,
            skip_blank_lines=False,
        )
    except UnicodeDecodeError:
        raise DataFormatError(path, *locate_decode_error(path, "utf-8")) from None
    except pd.errors.EmptyDataError:  # blank lines only
        raise DataFormatError(path, 1, "no header line") from None
    except pd.errors.ParserError as exc:
        match = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if match is None:
            raise DataFormatError(path, None, f"not readable as CSV: {exc}") from None
        expected, line, found = (int(g) for g in match.groups())
        raise DataFormatError(path, line, f"expected {expected} fields, found {found}") from None
    header = [str(name) for name in raw.iloc[0]]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataFormatError(path, 1, f"header repeats column(s) {repeated}")
    if len(raw) < 2:
        raise DataFormatError(path, None, "no data rows")
    frame = raw.iloc[1:].reset_index(drop=True)
    frame.columns = header
    return frame


def read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow  # noqa: F401  (pandas' Parquet engine)
    except ImportError:
        raise DataFormatError(
            path, None, "reading Parquet needs pyarrow: pip install 'slimrec[train]'"
        ) from None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise DataFormatError(path, None, f"not a readable Parquet file: {exc}") from None
    if len(frame) == 0:
        raise DataFormatError(path, None, "no data rows")
    return frame


def interactions(path: Path, frame: pd.DataFrame, first_line: int | None) -> pd.DataFrame:
    """user_id, item_id, rating, timestamp from a read table; ids as text, numbers checked."""
    names = {_plain_name(c): c for c in frame.columns}
    ids = {key: pd.Series(category_text(frame[names[key]])) for key in ("user_id", "item_id")}
    reject_empty_ids(path, pd.DataFrame(ids), ["user_id", "item_id"], first_line)
    rating = (
        numbers(path, frame[names["rating"]], "rating", first_line).astype(np.float32)
        if "rating" in names
        else np.ones(len(frame), np.float32)
    )
    return pd.DataFrame(
        {**ids, "rating": rating, "timestamp": timestamps(path, frame[names["timestamp"]], first_line)}
    )


def timestamps(path: Path, column: pd.Series, first_line: int | None) -> np.ndarray:
    """int64 seconds (or the file's own whole-number unit) from numbers or dates."""
    if column.dtype.kind == "M":
        return _epoch_seconds(column)
    values = numbers(path, column, "timestamp", first_line, strict=column.dtype.kind in "fiub")
    if np.isnan(values).any():  # text that is not all numbers: dates, or an error
        dates = pd.to_datetime(column, format="ISO8601", utc=True, errors="coerce")
        neither = np.isnan(values) & dates.isna().to_numpy()
        if not dates.isna().any():
            return _epoch_seconds(dates)
        row = int(np.flatnonzero(neither if neither.any() else dates.isna().to_numpy())[0])
        problem = (
            f"timestamp is neither a whole number nor an ISO 8601 date: {column.iloc[row]!r}"
            if neither.any()
            else f"timestamp mixes numbers and dates: {column.iloc[row]!r}"
        )
        raise DataFormatError.at_row(path, first_line, row, problem)
    bad = (values != np.round(values)) | (np.abs(values) >= 2.0**63)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        problem = f"timestamp is not a whole number in the int64 range: {column.iloc[row]!r}"
        raise DataFormatError.at_row(path, first_line, row, problem)
    return values.astype(np.int64)


def numbers(
    path: Path, column: pd.Series, name: str, first_line: int | None, strict: bool = True
) -> np.ndarray:
    """float64 values; with `strict`, the first value that is no finite number is an error."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64, na_value=np.nan, copy=True)
    values[~np.isfinite(values)] = np.nan
    if strict and np.isnan(values).any():
        row = int(np.flatnonzero(np.isnan(values))[0])
        raise DataFormatError.at_row(path, first_line, row, f"{name} is not a number: {column.iloc[row]!r}")
    return values


def read_feature_table(path: Path | None, key: str) -> pd.DataFrame | None:
    """A users / items table through side_features; None when there is none."""
    if path is None:
        return None
    frame, first_line = read_table(path)
    columns = typed_columns(path, frame, first_line)
    ids = next((c for c in columns if c.name == key), None)
    require_columns(path, [c.name for c in columns], [key])
    assert ids is not None
    id_text = pd.Series(category_text(ids.values))
    reject_empty_ids(path, pd.DataFrame({key: id_text}), [key], first_line)
    repeated = id_text.duplicated().to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise DataFormatError.at_row(path, first_line, row, f"duplicate {key} {id_text.iloc[row]!r}")
    features = [c for c in columns if c.name != key]
    to_slots = user_features if key == "user_id" else item_features
    return to_slots(path, id_text, features)


def typed_columns(path: Path, frame: pd.DataFrame, first_line: int | None) -> list[TypedColumn]:
    """Each column with its RecBole type: from a `name:type` header, else inferred from its values."""
    columns = []
    for header in frame.columns:
        name, colon, kind = str(header).rpartition(":")
        if not colon or kind not in KINDS:
            name, kind = str(header), _inferred_kind(frame[header])
        columns.append(TypedColumn(name, kind, frame[header], first_line))
    return columns


def _inferred_kind(values: pd.Series) -> str:
    if values.dtype.kind in "fiu":
        return "float"
    if values.map(lambda v: isinstance(v, list | tuple | np.ndarray)).any():
        return "token_seq"
    text = values.dropna().astype(str)
    text = text[text.str.strip() != ""]
    if len(text) and pd.to_numeric(text, errors="coerce").notna().all():
        return "float"
    return "token"


def _plain_name(header: object) -> str:
    name, colon, kind = str(header).rpartition(":")
    return name if colon and kind in KINDS else str(header)


def _epoch_seconds(dates: pd.Series) -> np.ndarray:
    if dates.dt.tz is not None:
        dates = dates.dt.tz_convert("UTC").dt.tz_localize(None)
    return ((dates - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).to_numpy(np.int64)
