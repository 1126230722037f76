"""RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`, tab-separated with a typed header.

Header fields are `name:type` with RecBole's types (token, token_seq, float, float_seq). The
`.inter` file needs user_id, item_id and timestamp; rating is optional (1.0 where absent:
implicit feedback). The `.user` / `.item` columns, whatever their names, are mapped onto the
model's feature slots by `slimrec.models.side_features`. Ids are any text without a tab or a
line break: titles, prefixed user ids, spaces, punctuation, unicode.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from slimrec.models.data import DataFormatError, Dataset, build_dataset
from slimrec.models.delimited import read_delimited, read_lines, sniff_encoding
from slimrec.models.grouplens import reject_duplicate_ids
from slimrec.models.side_features import KINDS, TypedColumn, item_features, user_features

INTERACTION_NUMBERS = {"rating": "float32", "timestamp": "int64"}


def load_atomic(path: Path) -> Dataset:
    """The dataset in `path`: one `*.inter`, and the `.user` / `.item` files of its name if present."""
    inter = _single(path, "*.inter")
    name = inter.stem
    ratings = read_interactions(inter)
    users = read_features(path / f"{name}.user", "user_id", user_features)
    items = read_features(path / f"{name}.item", "item_id", item_features)
    return build_dataset(name, ratings, users, items)


def read_header(path: Path, encoding: str) -> list[tuple[str, str]]:
    """[(name, type)] from line 1; a field without a known RecBole type is an error."""
    lines = read_lines(path, encoding, limit=1)
    if not lines or not lines[0].strip():
        raise DataFormatError(path, 1, "no header line (name:type fields separated by tabs)")
    fields = []
    for field in lines[0].lstrip("\ufeff").split("\t"):
        name, colon, kind = field.rpartition(":")
        if not colon or kind not in KINDS:
            raise DataFormatError(path, 1, f"header field {field!r} is not name:type with a type in {KINDS}")
        fields.append((name, kind))
    names = [n for n, _ in fields]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataFormatError(path, 1, f"header repeats column(s) {repeated}")
    return fields


def read_interactions(path: Path) -> pd.DataFrame:
    """user_id, item_id, rating, timestamp; numbers checked line by line."""
    encoding = sniff_encoding(path)
    names = [n for n, _ in read_header(path, encoding)]
    require_columns(path, names, ["user_id", "item_id", "timestamp"])
    numeric = {c: t for c, t in INTERACTION_NUMBERS.items() if c in names}
    frame = read_delimited(path, "\t", names, numeric, header_lines=1, encoding=encoding)
    reject_empty_ids(path, frame, ["user_id", "item_id"], first_line=2)
    if "rating" not in frame:
        frame["rating"] = np.float32(1.0)
    return frame[["user_id", "item_id", "rating", "timestamp"]]


def read_features(
    path: Path, key: str, to_slots: Callable[[Path, pd.Series, list[TypedColumn]], pd.DataFrame]
) -> pd.DataFrame | None:
    """A `.user` / `.item` file through `to_slots` (side_features); None when there is no file."""
    if not path.exists():
        return None
    encoding = sniff_encoding(path)
    header = read_header(path, encoding)
    names = [n for n, _ in header]
    require_columns(path, names, [key])
    frame = read_delimited(path, "\t", names, {}, header_lines=1, encoding=encoding)
    reject_empty_ids(path, frame, [key], first_line=2)
    reject_duplicate_ids(path, frame[key], first_line=2)
    columns = [TypedColumn(name, kind, frame[name]) for name, kind in header if name != key]
    return to_slots(path, frame[key], columns)


def require_columns(path: Path, names: list[str], required: list[str]) -> None:
    missing = [c for c in required if c not in names]
    if missing:
        raise DataFormatError(path, 1, f"header lacks column(s) {missing}; found {names}")


def reject_empty_ids(path: Path, frame: pd.DataFrame, keys: list[str], first_line: int | None) -> None:
    """An empty (or missing) id names no one: an error at its line (or row, for Parquet)."""
    for key in keys:
        empty = (frame[key].isna() | frame[key].astype(str).str.strip().eq("")).to_numpy()
        if empty.any():
            raise DataFormatError.at_row(path, first_line, int(np.flatnonzero(empty)[0]), f"{key} is empty")


def _single(path: Path, pattern: str) -> Path:
    found = sorted(path.glob(pattern))
    if len(found) != 1:
        raise DataFormatError(path, None, f"expected exactly one {pattern} file, found {len(found)}")
    return found[0]
