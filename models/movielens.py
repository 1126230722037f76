"""Load MovieLens (and anything written in the same formats) into a `Dataset`.

Formats, detected from the files in a directory:
  - RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item` (tab-separated, typed header)
  - GroupLens 100K: `u.data`, `u.user`, `u.item`
  - GroupLens 1M / 10M: `ratings.dat`, `users.dat` (1M only), `movies.dat`
  - GroupLens 20M / 25M / latest: `ratings.csv`, `movies.csv`

`load_dataset("ml-100k")` looks the name up under `data_root()`; a path loads that directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from models.data import DataFormatError, Dataset, build_dataset

DATA_DIR_ENV = "SLIMREC_DATA_DIR"


def data_root() -> Path:
    """Where named datasets live: $SLIMREC_DATA_DIR, else ./data."""
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def resolve_data_path(spec: str | Path) -> Path:
    """A dataset name under `data_root()` or a directory path; errors say where we looked."""
    path = Path(spec)
    if path.is_dir():
        return path
    named = data_root() / str(spec)
    if named.is_dir():
        return named
    raise FileNotFoundError(
        f"no dataset {str(spec)!r}: neither a directory nor {named} exists "
        f"(run `slimrec data fetch {spec}` or set {DATA_DIR_ENV})"
    )


def load_dataset(spec: str | Path) -> Dataset:
    path = resolve_data_path(spec)
    fmt = detect_format(path)
    return LOADERS[fmt](path)


def detect_format(path: Path) -> str:
    if list(path.glob("*.inter")):
        return "atomic"
    if (path / "u.data").exists():
        return "grouplens-100k"
    if (path / "ratings.dat").exists():
        return "grouplens-dat"
    if (path / "ratings.csv").exists():
        return "grouplens-csv"
    raise DataFormatError(
        path, None, "no known ratings file (*.inter, u.data, ratings.dat or ratings.csv)"
    )


# --- shared parsing helpers --------------------------------------------------------------


def read_delimited(
    path: Path,
    sep: str,
    names: list[str],
    numeric: dict[str, str],
    header_lines: int = 0,
    encoding: str | None = None,
) -> pd.DataFrame:
    """Read a delimited file with exactly `len(names)` fields per line, as strings,
    then convert the `numeric` columns ({name: dtype}); any bad line is reported by number.
    """
    if not path.exists():
        raise DataFormatError(path, None, "file not found")
    if path.stat().st_size == 0:
        raise DataFormatError(path, None, "file is empty")
    encoding = encoding or sniff_encoding(path)
    try:
        frame = pd.read_csv(
            path, sep=sep, header=None, names=names, skiprows=header_lines, dtype=str,
            keep_default_na=False, engine="c", encoding=encoding, quoting=3,
        )
    except pd.errors.ParserError as exc:
        raise DataFormatError(path, _line_from_parser_error(exc), f"wrong number of fields ({exc})") from None
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, None, f"cannot decode as {encoding}: {exc.reason}") from None
    if len(frame) == 0:
        raise DataFormatError(path, None, "no data rows")
    # A short line leaves trailing fields empty instead of failing to parse.
    missing = frame[names[-1]].eq("")
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise DataFormatError(path, header_lines + row + 1, f"expected {len(names)} fields, found fewer")
    for column, dtype in numeric.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataFormatError(
                path, header_lines + row + 1, f"{column} is not a number: {frame[column].iloc[row]!r}"
            )
        frame[column] = values.astype(dtype)
    return frame


def sniff_encoding(path: Path) -> str:
    """utf-8 when the file decodes as such, else latin-1 (MovieLens 100K/1M titles are latin-1)."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    try:
        head.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError as exc:
        # A cut at the end of the 1 MiB window is not evidence of latin-1.
        return "utf-8" if exc.start >= len(head) - 3 else "latin-1"


def _line_from_parser_error(exc: Exception) -> int | None:
    import re

    match = re.search(r"line (\d+)", str(exc))
    return int(match.group(1)) if match else None


# --- RecBole atomic files ----------------------------------------------------------------


def load_atomic(path: Path) -> Dataset:
    """RecBole atomic files: a header of `name:type` fields, tab-separated rows."""
    inter = _single(path, "*.inter")
    name = inter.stem
    ratings = _read_atomic(inter, {"user_id": str, "item_id": str, "rating": "float32", "timestamp": "int64"})
    users = items = None
    if (path / f"{name}.user").exists():
        users = _read_atomic(path / f"{name}.user", {"user_id": str, "age": "int32", "gender": str,
                                                     "occupation": str, "zip_code": str})
    if (path / f"{name}.item").exists():
        raw = _read_atomic(path / f"{name}.item", {"item_id": str, "movie_title": str,
                                                   "release_year": str, "class": str})
        items = pd.DataFrame({
            "item_id": raw["item_id"],
            "title": raw["movie_title"],
            "genres": raw["class"].str.split().str.join("|"),
            "year": pd.to_numeric(raw["release_year"], errors="coerce").fillna(-1).astype("int32"),
        })
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


LOADERS = {"atomic": load_atomic}
