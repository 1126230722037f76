"""Bad data files: whatever is done to a valid data directory (MovieLens' formats, RecBole atomic
files, plain CSV tables), loading either works or raises DataFormatError naming the file (and
the line, when one line is to blame). Never a pandas, numpy or Unicode error, never a silently
wrong dataset.

Targeted properties pin the exact line for the classic faults (wrong column count,
non-numeric rating, duplicate id) in every format; a broad one throws random mutations
(inserted garbage lines, truncation, stray bytes, UTF-16, swapped separators, empty files)
at every file of every format.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from slimrec.models.data import DataFormatError
from slimrec.models.movielens import load_dataset

# The atomic fixture's `price` column has no model slot: its warning is expected, every time.
pytestmark = pytest.mark.filterwarnings("ignore::slimrec.models.side_features.IgnoredColumnsWarning")
FUZZ = settings(
    max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)

FLAGS = "|".join("0" * 19)
FORMATS = {
    "ml-100k": {
        "u.data": (
            "\t",
            ["1\t10\t4\t880000000", "2\t10\t3\t880000100", "2\t20\t5\t880000200", "3\t30\t1\t880000300"],
        ),
        "u.user": ("|", ["1|24|M|technician|85711", "2|53|F|other|94043", "3|23|M|writer|32067"]),
        "u.item": (
            "|",
            [
                f"10|Toy Story (1995)|01-Jan-1995||http://x|{FLAGS}",
                f"20|Heat (1995)|||http://x|{FLAGS}",
                f"30|Babe (1995)|||http://x|{FLAGS}",
            ],
        ),
    },
    "ml-1m": {
        "ratings.dat": ("::", ["1::10::5::978300760", "1::20::3::978302109", "2::30::4::978301968"]),
        "users.dat": ("::", ["1::F::1::10::48067", "2::M::56::16::70072"]),
        "movies.dat": (
            "::",
            ["10::Toy Story (1995)::Animation", "20::Heat (1995)::Action", "30::Babe (1995)::Comedy"],
        ),
    },
    "ml-25m": {
        "ratings.csv": (
            ",",
            [
                "userId,movieId,rating,timestamp",
                "1,10,4.5,1112486027",
                "1,20,0.5,1112484676",
                "7,30,3.0,1094785740",
            ],
        ),
        "movies.csv": (
            ",",
            [
                "movieId,title,genres",
                "10,Toy Story (1995),Animation",
                "20,Heat (1995),Action",
                "30,Babe (1995),Comedy",
            ],
        ),
    },
    # RecBole atomic files with other people's columns and ids (titles, prefixes, slashes, spaces).
    "atomic": {
        "awk.inter": (
            "\t",
            [
                "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                "1m_1\tToy Story (1995)\t5\t978300760",
                "1m_1\tHeat/2 (1995)\t3\t978302109",
                "u ü\tBabe (1995)\t4\t978301968",
            ],
        ),
        "awk.user": ("\t", ["user_id:token\tage:float\tjob:float", "1m_1\t1\t10", "u ü\t56\t16"]),
        "awk.item": (
            "\t",
            [
                "item_id:token\tyear:float\tgenre:token\tprice:float",
                "Toy Story (1995)\t1995\tAnimation Comedy\t1",
                "Heat/2 (1995)\t1995\tAction\t2",
                "Babe (1995)\t1995\tComedy Drama\t3",
            ],
        ),
    },
    "table": {
        "interactions.csv": (
            ",",
            [
                "user_id,item_id,rating,timestamp",
                "u/1,Toy Story (1995),4.5,1112486027",
                "u/1,Heat (1995),0.5,1112484676",
                "u 7,Babe (1995),3.0,1094785740",
            ],
        ),
        "users.csv": (",", ["user_id,age,gender", "u/1,25,F", "u 7,,M"]),
        "items.csv": (
            ",",
            ["item_id,genres,year", "Toy Story (1995),Animation|Comedy,1995", "Heat (1995),Action,1995"],
        ),
    },
}
RATINGS = {
    "ml-100k": "u.data",
    "ml-1m": "ratings.dat",
    "ml-25m": "ratings.csv",
    "atomic": "awk.inter",
    "table": "interactions.csv",
}
ID_FILES = [
    ("ml-100k", "u.user"),
    ("ml-100k", "u.item"),
    ("ml-1m", "users.dat"),
    ("ml-1m", "movies.dat"),
    ("ml-25m", "movies.csv"),
    ("atomic", "awk.user"),
    ("atomic", "awk.item"),
    ("table", "users.csv"),
    ("table", "items.csv"),
]
# Lines before the data: a header in the CSV and atomic files.
HEADER = dict.fromkeys(["ratings.csv", "movies.csv", "awk.inter", "awk.user", "awk.item"], 1) | dict.fromkeys(
    ["interactions.csv", "users.csv", "items.csv"], 1
)


def write_dataset(root: Path, fmt: str, override: dict[str, bytes] | None = None) -> Path:
    directory = root / fmt
    directory.mkdir(parents=True, exist_ok=True)
    for name, (_, lines) in FORMATS[fmt].items():
        (directory / name).write_bytes((override or {}).get(name, ("\n".join(lines) + "\n").encode()))
    return directory


def load_with(fmt: str, name: str, data: bytes):
    """Load format `fmt` with file `name` replaced by `data`; returns the dataset or the DataFormatError."""
    with tempfile.TemporaryDirectory() as scratch:
        try:
            return load_dataset(write_dataset(Path(scratch), fmt, {name: data}))
        except DataFormatError as exc:
            return exc


def assert_names(error: DataFormatError, name: str, line: int | None = None) -> None:
    assert Path(error.path).name == name, str(error)
    assert name in str(error)
    if error.line is not None:
        assert f"line {error.line}:" in str(error)
    if line is not None:
        assert error.line == line, str(error)


def test_the_fixtures_load():
    for fmt in FORMATS:
        with tempfile.TemporaryDirectory() as scratch:
            assert len(load_dataset(write_dataset(Path(scratch), fmt)).interactions) >= 3


# --- targeted: the exact line ------------------------------------------------------------------------


@FUZZ
@given(fmt=st.sampled_from(list(RATINGS)), position=st.integers(0, 3), data=st.data())
def test_wrong_field_count_names_the_line(fmt, position, data):
    name = RATINGS[fmt]
    sep, lines = FORMATS[fmt][name]
    lines = list(lines)
    header = HEADER.get(name, 0)
    position = min(position + header, len(lines))
    fields = lines[header].split(sep)
    n_fields = data.draw(st.sampled_from([1, 2, 3, 5, 6]), label="fields")
    lines.insert(position, sep.join((fields * 2)[:n_fields]))
    error = load_with(fmt, name, ("\n".join(lines) + "\n").encode())
    assert isinstance(error, DataFormatError), "a line with the wrong field count was accepted"
    assert_names(error, name, position + 1)


@FUZZ
@given(
    fmt=st.sampled_from(list(RATINGS)),
    row=st.integers(0, 2),
    rating=st.sampled_from(["four", "x", "", " ", "4,5", "1e", "--1", "0x10", "\u0664", "½"]),
)
def test_non_numeric_rating_names_the_line(fmt, row, rating):
    name = RATINGS[fmt]
    sep, lines = FORMATS[fmt][name]
    lines = list(lines)
    header = HEADER.get(name, 0)
    if sep == "," and "," in rating:
        rating = rating.replace(",", ";")
    fields = lines[header + row].split(sep)
    fields[2] = rating
    lines[header + row] = sep.join(fields)
    error = load_with(fmt, name, ("\n".join(lines) + "\n").encode())
    assert isinstance(error, DataFormatError), f"rating {rating!r} was accepted"
    assert_names(error, name, header + row + 1)


@FUZZ
@given(target=st.sampled_from(ID_FILES), source=st.integers(0, 2), position=st.integers(0, 3))
def test_duplicate_ids_name_the_line(target, source, position):
    fmt, name = target
    _, lines = FORMATS[fmt][name]
    lines = list(lines)
    header = HEADER.get(name, 0)
    data_lines = lines[header:]
    source = min(source, len(data_lines) - 1)
    position = min(position, len(data_lines))
    duplicate = data_lines[source]
    data_lines.insert(position, duplicate)
    second = max(position, source + (1 if position <= source else 0))  # index of the later copy
    error = load_with(fmt, name, ("\n".join(lines[:header] + data_lines) + "\n").encode())
    assert isinstance(error, DataFormatError), "a duplicate id was accepted"
    assert_names(error, name, header + second + 1)
    assert "duplicate" in str(error)


@pytest.mark.parametrize(("fmt", "name"), [(f, n) for f, files in FORMATS.items() for n in files])
def test_empty_and_blank_files_are_refused(fmt, name):
    for data in (b"", b"\n", b"\n\n\n"):
        error = load_with(fmt, name, data)
        assert isinstance(error, DataFormatError), f"{name} as {data!r} was accepted"
        assert_names(error, name)


@pytest.mark.parametrize(("fmt", "name"), [(f, n) for f, files in FORMATS.items() for n in files])
def test_utf16_files_are_refused_naming_the_file(fmt, name):
    _, lines = FORMATS[fmt][name]
    error = load_with(fmt, name, ("\n".join(lines) + "\n").encode("utf-16"))
    assert isinstance(error, DataFormatError), f"{name} in UTF-16 was accepted"
    assert_names(error, name)


# --- broad: random damage, only ever a DataFormatError ----------------------------------------------

GARBAGE_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\n\r"), max_size=40)


@st.composite
def damaged(draw) -> tuple[str, str, bytes, str]:
    fmt = draw(st.sampled_from(list(FORMATS)), label="format")
    name = draw(st.sampled_from(list(FORMATS[fmt])), label="file")
    sep, lines = FORMATS[fmt][name]
    lines = list(lines)
    how = draw(st.sampled_from(["insert", "replace", "truncate", "bytes", "separator", "field"]), label="how")
    if how == "insert":
        lines.insert(draw(st.integers(0, len(lines))), draw(GARBAGE_TEXT))
    elif how == "replace":
        lines[draw(st.integers(0, len(lines) - 1))] = draw(GARBAGE_TEXT)
    elif how == "separator":
        other = draw(st.sampled_from([s for s in ("\t", "|", "::", ",", ";", " ") if s != sep]))
        row = draw(st.integers(0, len(lines) - 1))
        lines[row] = lines[row].replace(sep, other)
    elif how == "field":
        row = draw(st.integers(0, len(lines) - 1))
        fields = lines[row].split(sep)
        fields[draw(st.integers(0, len(fields) - 1))] = draw(GARBAGE_TEXT.filter(lambda t: sep not in t))
        lines[row] = sep.join(fields)
    data = ("\n".join(lines) + "\n").encode()
    if how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "bytes":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + draw(st.binary(min_size=1, max_size=6)) + data[at:]
    return fmt, name, data, how


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(case=damaged())
@example(case=("ml-100k", "u.data", b"1\t10\t4\t880000000\n\x00\n", "bytes"))
@example(case=("ml-1m", "ratings.dat", b"1::10::5::978300760\n1::10::5\n", "truncate"))
@example(case=("ml-25m", "ratings.csv", b"userId,movieId,rating,timestamp\n", "truncate"))
@example(case=("ml-100k", "u.item", b"10|T|||u|" + b"|".join([b"2"] * 19) + b"\n", "field"))
def test_damaged_files_load_or_raise_data_format_error(case):
    fmt, name, data, how = case
    with tempfile.TemporaryDirectory() as scratch:
        directory = write_dataset(Path(scratch), fmt, {name: data})
        try:
            dataset = load_dataset(directory)
        except DataFormatError as error:
            assert_names(error, name)
            return
    # Accepted: only damage a loader may legitimately accept (a field changed to another valid
    # value, an extra valid-looking row); the result must still be a usable dataset.
    assert len(dataset.interactions) > 0 and dataset.n_items > 0 and dataset.n_users > 0
