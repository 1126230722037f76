"""RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item`, tab-separated with a typed header."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from slimrec.models.data import DataFormatError, Dataset, build_dataset
from slimrec.models.delimited import read_delimited, sniff_encoding


def load_atomic(path: Path) -> Dataset:
    """RecBole atomic files: a header of `name:type` fields, tab-separated rows."""
    inter = _single(path, "*.inter")
    name = inter.stem
    ratings = _read_atomic(inter, {"user_id": str, "item_id": str, "rating": "float32", "timestamp": "int64"})
    users = items = None
    if (path / f"{name}.user").exists():
        users = _read_atomic(
            path / f"{name}.user",
            {"user_id": str, "age": "int32", "gender": str, "occupation": str, "zip_code": str},
        )
    if (path / f"{name}.item").exists():
        raw = _read_atomic(
            path / f"{name}.item", {"item_id": str, "movie_title": str, "release_year": str, "class": str}
        )
        items = pd.DataFrame(
            {
                "item_id": raw["item_id"],
                "title": raw["movie_title"],
                "genres": raw["class"].str.split().str.join("|"),
                "year": pd.to_numeric(raw["release_year"], errors="coerce").fillna(-1).astype("int32"),
            }
        )
    return build_dataset(name, ratings, users, items)


def _single(path: Path, pattern: str) -> Path:
    found = sorted(path.glob(pattern))
    if len(found) != 1:
        raise DataFormatError(path, None, f"expected exactly one {pattern} file, found {len(found)}")
    return found[0]


def _read_atomic(path: Path, wanted: dict[str, object]) -> pd.DataFrame:
    """Read the columns in `wanted` (by their name before ':'); other columns are ignored."""
    encoding = sniff_encoding(path)
    with open(path, encoding=encoding) as f:
        header = f.readline().rstrip("\n").split("\t")
    names = [field.split(":")[0] for field in header]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise DataFormatError(path, 1, f"header lacks column(s) {missing}; found {names}")
    numeric = {c: t for c, t in wanted.items() if t is not str}
    frame = read_delimited(path, "\t", names, numeric, header_lines=1, encoding=encoding)
    return frame[list(wanted)]
