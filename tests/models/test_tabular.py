"""Plain CSV / Parquet tables of interactions with optional user and item tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from slimrec.models.data import DataFormatError
from slimrec.models.movielens import detect_format, load_dataset
from slimrec.models.side_features import IgnoredColumnsWarning
from slimrec.models.synth import generate_synthetic, write_synthetic

U1, U2 = "user/1 Zoë", "100% ü"
I1, I2, I3 = "Toy Story (1995)", "American President, The (1995)", 'Say "Hi"/b'
INTERACTIONS = (
    "user_id,item_id,timestamp,rating\n"
    f'{U1},{I1},978300760,5\n{U1},"{I2}",978300761,3\n{U2},"{I3.replace(chr(34), 2 * chr(34))}",978300762,4\n'
)
ITEMS = f'item_id,title,genres,year\n{I1},Toy Story,Animation|Children\'s,1995\n"{I2}",Am. Pres.,Drama,1995\n'
USERS = f"user_id,age,gender,zip_code\n{U1},25,F,02134\n{U2},,M,\n"


def tables(tmp_path: Path, **files: str) -> Path:
    directory = tmp_path / "tables"
    directory.mkdir()
    for name, text in {"interactions.csv": INTERACTIONS, **files}.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_csv_with_quoted_awkward_ids_and_feature_tables(tmp_path):
    path = tables(tmp_path, **{"items.csv": ITEMS, "users.csv": USERS})
    assert detect_format(path) == "table"
    ds = load_dataset(path)
    assert ds.name == "tables"
    assert sorted(ds.items.raw_ids) == sorted([I1, I2, I3])
    pairs = zip(ds.interactions.user, ds.interactions.item, strict=True)
    assert [(ds.users.raw_ids[u], ds.items.raw_ids[i]) for u, i in pairs] == [(U1, I1), (U1, I2), (U2, I3)]
    assert list(ds.interactions.rating) == [5, 3, 4]
    items = {i: (t, g, y) for i, t, g, y in zip(*vars(ds.items).values(), strict=True)}
    assert items[I1] == ("Toy Story", "Animation|Children's", 1995)
    assert items[I3] == ("", "", -1)  # not in items.csv
    users = dict(zip(ds.users.raw_ids, zip(ds.users.age, ds.users.zip_code, strict=True), strict=True))
    assert users == {U1: (25, "02134"), U2: (-1, "")}  # an empty field is unknown; zip keeps its 0


def test_dates_as_timestamps_and_no_ratings(tmp_path):
    text = "user_id,item_id,timestamp\na,x,2001-01-01T00:00:00Z\na,y,2001-01-01 00:00:01\n"
    ds = load_dataset(tables(tmp_path, **{"interactions.csv": text}))
    assert list(ds.interactions.timestamp) == [978307200, 978307201]
    assert list(ds.interactions.rating) == [1.0, 1.0]


def test_typed_headers_and_unused_columns(tmp_path):
    items = f"item_id:token,kind:token_seq,price\n{I1},kids fun,9.5\n"
    with pytest.warns(
        IgnoredColumnsWarning, match=r"items.csv: no model slot for column\(s\) price \(float\)"
    ):
        ds = load_dataset(tables(tmp_path, **{"items.csv": items}))
    assert ds.items.genres[list(ds.items.raw_ids).index(I1)] == "kids|fun"


def test_parquet_with_integer_ids_lists_and_datetimes(tmp_path):
    directory = tmp_path / "pq"
    directory.mkdir()
    pd.DataFrame(
        {
            "user_id": [7, 7, 8],
            "item_id": [10, 20, 10],
            "timestamp": pd.to_datetime(["2001-01-01", "2001-01-02", "2001-01-03"], utc=True),
        }
    ).to_parquet(directory / "interactions.parquet")
    items = pd.DataFrame({"item_id": [10, 20], "tags": [["a", "b"], []], "release_year": [1999.0, None]})
    items.to_parquet(directory / "items.parquet")
    pd.DataFrame({"user_id": [7], "occupation": [3.0]}).to_parquet(directory / "users.parquet")
    ds = load_dataset(directory)
    assert list(ds.users.raw_ids) == ["7", "8"] and list(ds.items.raw_ids) == ["10", "20"]
    assert list(ds.interactions.timestamp) == [978307200, 978393600, 978480000]
    assert list(ds.items.genres) == ["a|b", ""] and list(ds.items.year) == [1999, -1]
    assert list(ds.users.occupation) == ["3", ""]


def test_parquet_errors_name_the_row(tmp_path):
    directory = tmp_path / "pq"
    directory.mkdir()
    frame = pd.DataFrame({"user_id": ["a", None], "item_id": ["x", "y"], "timestamp": [1, 2]})
    frame.to_parquet(directory / "interactions.parquet")
    with pytest.raises(DataFormatError, match=r"interactions.parquet: row 2: user_id is empty"):
        load_dataset(directory)
    (directory / "interactions.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataFormatError, match="not a readable Parquet file"):
        load_dataset(directory)


BAD = {
    "missing column": ("interactions.csv", "user_id,item,timestamp\na,x,1\n", 1),
    "extra field": ("interactions.csv", INTERACTIONS + "a,x,5,1,9\n", 5),
    "short line": ("interactions.csv", INTERACTIONS + "a,x\n", 5),
    "bad timestamp": ("interactions.csv", INTERACTIONS + "a,x,later,1\n", 5),
    "fractional timestamp": ("interactions.csv", INTERACTIONS + "a,x,1.5,1\n", 5),
    "bad rating": ("interactions.csv", INTERACTIONS + "a,x,1,good\n", 5),
    "empty item id": ("interactions.csv", INTERACTIONS + "a,,1,1\n", 5),
    "duplicate user": ("users.csv", USERS + f"{U2},30,F,1\n", 4),
    "float age": ("users.csv", "user_id,age:float\na,old\n", 2),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_csv_names_file_and_line(tmp_path, case):
    name, text, line = BAD[case]
    with pytest.raises(DataFormatError) as caught:
        load_dataset(tables(tmp_path, **{name: text}))
    assert Path(caught.value.path).name == name
    assert caught.value.line == line, str(caught.value)


def test_csv_and_parquet_side_by_side_is_ambiguous(tmp_path):
    path = tables(tmp_path)
    pd.DataFrame({"user_id": ["a"], "item_id": ["x"], "timestamp": [1]}).to_parquet(
        path / "interactions.parquet"
    )
    with pytest.raises(DataFormatError, match="both interactions.csv and interactions.parquet"):
        load_dataset(path)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_table_and_atomic_files_of_the_same_data_load_alike(tmp_path, suffix):
    atomic = load_dataset(write_synthetic(tmp_path / "atomic", n_items=50, n_users=30, n_interactions=400))
    ratings, users, items = generate_synthetic(n_items=50, n_users=30, n_interactions=400)
    directory = tmp_path / "synth"
    directory.mkdir()
    for name, frame in (("interactions", ratings), ("users", users), ("items", items)):
        if suffix == ".csv":
            frame.to_csv(directory / f"{name}.csv", index=False)
        else:
            frame.to_parquet(directory / f"{name}.parquet")
    table = load_dataset(directory)
    assert table.fingerprint() == atomic.fingerprint()
    for part in ("users", "items"):
        for field, values in vars(getattr(atomic, part)).items():
            assert list(getattr(getattr(table, part), field)) == list(values), (part, field)
