"""Load MovieLens (and anything written in the same formats) into a `Dataset`.

Formats, detected from the files in a directory:
  - RecBole atomic files: `<name>.inter`, `<name>.user`, `<name>.item` (tab-separated, typed header)
  - GroupLens 100K: `u.data`, `u.user`, `u.item`
  - GroupLens 1M / 10M: `ratings.dat`, `users.dat` (1M only), `movies.dat`
  - GroupLens 20M / 25M / latest: `ratings.csv`, `movies.csv`
  - Plain tables: `interactions.csv` or `.parquet` (user_id, item_id, timestamp[, rating]),
    optional `users.*` / `items.*` feature tables

`load_dataset("ml-100k")` looks the name up under `data_root()`; a path loads that directory.

The readers live beside this module, one per family of formats: `grouplens`, `recbole` and
`tabular` (the text formats on the checked line readers of `delimited`). Feature columns of
RecBole and plain tables meet the model's feature slots in `side_features`.
"""

from __future__ import annotations

import os
from pathlib import Path

from slimrec.models.data import DataFormatError, Dataset
from slimrec.models.grouplens import load_grouplens_100k, load_grouplens_csv, load_grouplens_dat
from slimrec.models.recbole import load_atomic
from slimrec.models.tabular import find_table, load_tables

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
    if find_table(path, "interactions") is not None:
        return "table"
    raise DataFormatError(
        path,
        None,
        "no known ratings file (*.inter, u.data, ratings.dat, ratings.csv, "
        "interactions.csv or interactions.parquet)",
    )


LOADERS = {
    "atomic": load_atomic,
    "grouplens-100k": load_grouplens_100k,
    "grouplens-dat": load_grouplens_dat,
    "grouplens-csv": load_grouplens_csv,
    "table": load_tables,
}
