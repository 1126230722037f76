"""Interaction datasets: one in-memory form for every source format.

Every loader (RecBole atomic files, GroupLens' own MovieLens formats, plain
CSV/Parquet tables, the synthetic generator) produces three pandas tables with
the columns below and hands them to `build_dataset`, which assigns dense
indices and validates. Other feature columns reach these through
`models.side_features`.

    ratings: user_id (str), item_id (str), rating (float32), timestamp (int64)
    users:   user_id (str), age (int, -1 unknown), gender (str), occupation (str), zip_code (str)
    items:   item_id (str), title (str), genres (str, "|"-joined), year (int, -1 unknown)

Raw ids stay strings end to end (the API speaks them); indices are assigned in
id order, numeric ids compared as numbers, so "sort by (timestamp, item_id)"
in PROTOCOL.md is a sort by (timestamp, item index).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code"]
ITEM_COLUMNS = ["item_id", "title", "genres", "year"]
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]


class DataFormatError(ValueError):
    """A data file that cannot be read; the message names the file, the line and the problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str):
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {problem}")
        self.path, self.line, self.problem = str(path), line, problem

    @classmethod
    def at_row(cls, path: str | Path, first_line: int | None, row: int, problem: str) -> DataFormatError:
        """The error for data row `row` (0-based): at its line when rows have lines (`first_line`:
        the line of row 0), else naming the row (Parquet)."""
        if first_line is None:
            return cls(path, None, f"row {row + 1}: {problem}")
        return cls(path, first_line + row, problem)


@dataclass(frozen=True)
class Interactions:
    """Parallel arrays, one row per rating. `user`/`item` index `Dataset.users`/`Dataset.items`."""

    user: np.ndarray  # int32 [n]
    item: np.ndarray  # int32 [n]
    rating: np.ndarray  # float32 [n]
    timestamp: np.ndarray  # int64 [n]

    def __len__(self) -> int:
        return len(self.user)

    def take(self, rows: np.ndarray) -> Interactions:
        return Interactions(self.user[rows], self.item[rows], self.rating[rows], self.timestamp[rows])


@dataclass(frozen=True)
class Users:
    raw_ids: np.ndarray  # object [n_users] of str
    age: np.ndarray  # int32, -1 unknown
    gender: np.ndarray  # object of str, "" unknown
    occupation: np.ndarray  # object of str, "" unknown
    zip_code: np.ndarray  # object of str, "" unknown

    def __len__(self) -> int:
        return len(self.raw_ids)


@dataclass(frozen=True)
class Items:
    raw_ids: np.ndarray  # object [n_items] of str
    title: np.ndarray  # object of str
    genres: np.ndarray  # object of str, "|"-joined, "" unknown
    year: np.ndarray  # int32, -1 unknown

    def __len__(self) -> int:
        return len(self.raw_ids)


@dataclass(frozen=True)
class Dataset:
    name: str
    interactions: Interactions
    users: Users
    items: Items

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def fingerprint(self) -> str:
        """sha256 over the interaction arrays and id lists: names the exact data a model saw."""
        h = hashlib.sha256()
        for array in (self.interactions.user, self.interactions.item, self.interactions.timestamp):
            h.update(np.ascontiguousarray(array).tobytes())
        h.update("\x00".join(self.users.raw_ids).encode())
        h.update("\x00".join(self.items.raw_ids).encode())
        return h.hexdigest()


def sorted_ids(ids: pd.Series | np.ndarray) -> np.ndarray:
    """Unique raw ids in index order: numerically when every id is an integer, else as strings."""
    unique = pd.unique(pd.Series(ids, dtype=str))
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if len(unique) and not numeric.isna().any() and (numeric == numeric.round()).all():
        order = np.argsort(numeric.to_numpy(), kind="stable")
    else:
        order = np.argsort(unique.astype(str), kind="stable")
    return unique[order].astype(object)


def build_dataset(
    name: str,
    ratings: pd.DataFrame,
    users: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
) -> Dataset:
    """Index and validate the three tables (columns as in the module docstring).

    Users and items that appear only in the metadata stay in the catalogue;
    metadata missing for an id is filled with "unknown" values.
    """
    if len(ratings) == 0:
        raise ValueError(f"dataset {name!r} has no interactions")
    users = _empty(USER_COLUMNS) if users is None else users.astype({"user_id": str})
    items = _empty(ITEM_COLUMNS) if items is None else items.astype({"item_id": str})
    for table, key in ((users, "user_id"), (items, "item_id")):
        dup = table[key].duplicated()
        if dup.any():
            raise ValueError(f"dataset {name!r}: duplicate {key} {table[key][dup].iloc[0]!r} in metadata")

    user_ids, user_index = _index_ids(ratings["user_id"], users["user_id"])
    item_ids, item_index = _index_ids(ratings["item_id"], items["item_id"])
    interactions = Interactions(
        user=user_index,
        item=item_index,
        rating=ratings["rating"].to_numpy(np.float32),
        timestamp=ratings["timestamp"].to_numpy(np.int64),
    )
    u = users.set_index("user_id").reindex(user_ids)
    i = items.set_index("item_id").reindex(item_ids)
    return Dataset(
        name=name,
        interactions=interactions,
        users=Users(
            raw_ids=user_ids,
            age=u["age"].fillna(-1).to_numpy(np.int32),
            gender=_strings(u["gender"]),
            occupation=_strings(u["occupation"]),
            zip_code=_strings(u["zip_code"]),
        ),
        items=Items(
            raw_ids=item_ids,
            title=_strings(i["title"]),
            genres=_strings(i["genres"]),
            year=i["year"].fillna(-1).to_numpy(np.int32),
        ),
    )


def _index_ids(column: pd.Series, metadata_ids: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(all ids in index order, int32 index of every row of `column`).

    Factorizes the (possibly 25M-row) column once and sorts only its distinct ids.
    """
    codes, uniques = pd.factorize(column)
    uniques = pd.Series(uniques).astype(str)
    ids = sorted_ids(pd.concat([uniques, metadata_ids], ignore_index=True))
    position = pd.Index(ids).get_indexer(uniques)
    return ids, position[codes].astype(np.int32)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=object) for c in columns})


def _strings(column: pd.Series) -> np.ndarray:
    return column.fillna("").astype(str).to_numpy(object)
