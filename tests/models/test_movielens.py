"""GroupLens' own MovieLens formats: tiny hand-checkable files, the real 100K, and bad inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slimrec.models.data import DataFormatError
from slimrec.models.movielens import LOADERS, detect_format, load_dataset

SHARED_ML100K = Path("/work/shared/data/ml-100k")

U_DATA = "1\t10\t4\t880000000\n2\t10\t3\t880000100\n2\t20\t5\t880000200\n3\t30\t1\t880000300\n"
U_USER = "1|24|M|technician|85711\n2|53|F|other|94043\n3|23|M|writer|32067\n"
FLAGS_10 = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"  # Animation, Children's, Comedy
FLAGS_20 = "1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0"  # unknown only
FLAGS_30 = "0|0|0|0|0|0|0|0|1|0|0|0|0|0|1|0|0|0|0"  # Drama, Romance
U_ITEM = (
    f"10|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|{FLAGS_10}\n"
    f"20|unknown|||http://x|{FLAGS_20}\n"
    f"30|Misérables, Les (1995)|||http://x|{FLAGS_30}\n"
)

RATINGS_DAT = "1::10::5::978300760\n1::20::3::978302109\n2::30::4::978301968\n"
USERS_DAT = "1::F::1::10::48067\n2::M::56::16::70072\n"
MOVIES_DAT = (
    "10::Toy Story (1995)::Animation|Children's|Comedy\n"
    "20::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n"
    "30::Odd::Title (2000)::(no genres listed)\n"
)

RATINGS_CSV = (
    "userId,movieId,rating,timestamp\n1,10,4.5,1112486027\n1,20,0.5,1112484676\n7,30,3.0,1094785740\n"
)
MOVIES_CSV = (
    "movieId,title,genres\n"
    "10,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy\n"
    '20,"American President, The (1995)",Comedy|Drama|Romance\n'
    "30,Babylon 5,(no genres listed)\n"
)


def write(directory: Path, files: dict[str, str | bytes], encoding: str = "utf-8") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_bytes(text if isinstance(text, bytes) else text.encode(encoding))
    return directory


def ml100k(tmp_path: Path, **override: str | bytes) -> Path:
    files = {"u.data": U_DATA, "u.user": U_USER, "u.item": U_ITEM.encode("latin-1"), **override}
    return write(tmp_path / "ml-100k", files)


def ml1m(tmp_path: Path, **override: str | bytes) -> Path:
    files = {"ratings.dat": RATINGS_DAT, "users.dat": USERS_DAT, "movies.dat": MOVIES_DAT, **override}
    return write(tmp_path / "ml-1m", files, encoding="latin-1")


def ml25m(tmp_path: Path, **override: str | bytes) -> Path:
    return write(tmp_path / "ml-25m", {"ratings.csv": RATINGS_CSV, "movies.csv": MOVIES_CSV, **override})


# --- well-formed files -------------------------------------------------------------------


def test_loaders_are_registered():
    assert {"grouplens-100k", "grouplens-dat", "grouplens-csv"} <= set(LOADERS)


def test_100k(tmp_path):
    path = ml100k(tmp_path)
    assert detect_format(path) == "grouplens-100k"
    ds = load_dataset(path)
    assert ds.name == "ml-100k"
    assert list(ds.users.raw_ids) == ["1", "2", "3"]
    assert list(ds.items.raw_ids) == ["10", "20", "30"]
    assert list(ds.items.title) == ["Toy Story", "unknown", "Misérables, Les"]  # latin-1 decoded
    assert list(ds.items.year) == [1995, -1, 1995]  # release date, none, title's year
    assert list(ds.items.genres) == ["Animation|Children's|Comedy", "", "Drama|Romance"]
    assert list(ds.users.age) == [24, 53, 23]
    assert list(ds.users.occupation) == ["technician", "other", "writer"]
    assert list(ds.users.zip_code) == ["85711", "94043", "32067"]
    inter = ds.interactions
    assert list(inter.user) == [0, 1, 1, 2]
    assert list(inter.item) == [0, 0, 1, 2]
    assert list(inter.rating) == [4, 3, 5, 1]
    assert list(inter.timestamp) == [880000000, 880000100, 880000200, 880000300]


def test_1m(tmp_path):
    path = ml1m(tmp_path)
    assert detect_format(path) == "grouplens-dat"
    ds = load_dataset(path)
    assert list(ds.users.raw_ids) == ["1", "2"]
    assert list(ds.users.gender) == ["F", "M"]
    assert list(ds.users.age) == [1, 56]
    assert list(ds.users.occupation) == ["K-12 student", "self-employed"]
    assert list(ds.users.zip_code) == ["48067", "70072"]
    assert list(ds.items.title) == ["Toy Story", "Star Wars: Episode IV - A New Hope", "Odd::Title"]
    assert list(ds.items.year) == [1995, 1977, 2000]
    assert list(ds.items.genres) == ["Animation|Children's|Comedy", "Action|Sci-Fi", ""]
    assert list(ds.interactions.rating) == [5, 3, 4]
    assert list(ds.interactions.timestamp) == [978300760, 978302109, 978301968]


def test_10m_has_no_users_file_and_utf8_titles(tmp_path):
    movies = "10::Amélie (2001)::Comedy\n"
    path = write(tmp_path / "ml-10m", {"ratings.dat": RATINGS_DAT, "movies.dat": movies})
    ds = load_dataset(path)
    assert list(ds.users.raw_ids) == ["1", "2"]
    assert list(ds.users.age) == [-1, -1] and list(ds.users.gender) == ["", ""]
    assert ds.items.title[list(ds.items.raw_ids).index("10")] == "Amélie"


def test_csv(tmp_path):
    path = ml25m(tmp_path)
    assert detect_format(path) == "grouplens-csv"
    ds = load_dataset(path)
    assert list(ds.users.raw_ids) == ["1", "7"]
    assert list(ds.items.title) == ["Toy Story", "American President, The", "Babylon 5"]
    assert list(ds.items.year) == [1995, 1995, -1]
    assert list(ds.items.genres) == [
        "Adventure|Animation|Children|Comedy|Fantasy",
        "Comedy|Drama|Romance",
        "",
    ]
    assert list(ds.interactions.rating) == [4.5, 0.5, 3.0]
    assert ds.interactions.rating.dtype == np.float32


@pytest.mark.skipif(not SHARED_ML100K.is_dir(), reason="shared MovieLens 100K not present")
def test_real_ml100k():
    ds = load_dataset(SHARED_ML100K)
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (943, 1682, 100000)


# --- malformed files ---------------------------------------------------------------------

BAD_INPUTS = {
    "u.data extra field": (ml100k, {"u.data": U_DATA + "4\t10\t3\t880000400\t9\n"}, "u.data", 5),
    "u.data extra field, line 1": (ml100k, {"u.data": "4\t10\t3\t1\t9\n" + U_DATA}, "u.data", 1),
    "u.data short line": (ml100k, {"u.data": "1\t10\t4\t880000000\n2\t10\n" + U_DATA}, "u.data", 2),
    "u.data rating": (ml100k, {"u.data": U_DATA + "4\t10\tfour\t880000400\n"}, "u.data", 5),
    "u.data timestamp": (ml100k, {"u.data": "1\t10\t4\t88e\n" + U_DATA}, "u.data", 1),
    "u.data blank line": (ml100k, {"u.data": "1\t10\t4\t880000000\n\n" + U_DATA}, "u.data", 2),
    "u.data empty": (ml100k, {"u.data": ""}, "u.data", None),
    "u.item duplicate id": (ml100k, {"u.item": U_ITEM + f"20|Again (1990)|||u|{FLAGS_20}\n"}, "u.item", 4),
    "u.item flags": (ml100k, {"u.item": U_ITEM + f"40|X|||u|{FLAGS_20.replace('1', '2')}\n"}, "u.item", 4),
    "u.user duplicate id": (ml100k, {"u.user": U_USER + "2|30|M|other|12345\n"}, "u.user", 4),
    "ratings.dat rating": (ml1m, {"ratings.dat": "1::10::x::978300760\n"}, "ratings.dat", 1),
    "ratings.dat one colon": (ml1m, {"ratings.dat": RATINGS_DAT + "1::10::5:978300760\n"}, "ratings.dat", 4),
    "ratings.dat stray field": (ml1m, {"ratings.dat": RATINGS_DAT + "1:7:10::5::1\n"}, "ratings.dat", 4),
    "users.dat occupation": (ml1m, {"users.dat": USERS_DAT + "3::F::25::99::12345\n"}, "users.dat", 3),
    "movies.dat fields": (ml1m, {"movies.dat": MOVIES_DAT + "40::No genres\n"}, "movies.dat", 4),
    "movies.dat duplicate": (ml1m, {"movies.dat": MOVIES_DAT + "10::Again (1990)::Drama\n"}, "movies.dat", 4),
    "ratings.csv header": (ml25m, {"ratings.csv": "user,movie,rating,time\n1,10,4,1\n"}, "ratings.csv", 1),
    "ratings.csv id": (ml25m, {"ratings.csv": RATINGS_CSV + "u9,10,4.0,1\n"}, "ratings.csv", 5),
    "movies.csv latin-1 byte": (
        ml25m,
        {"movies.csv": MOVIES_CSV.encode() + b"40,Caf\xe9 (1999),Drama\n"},
        "movies.csv",
        5,
    ),
    "movies.csv fields": (ml25m, {"movies.csv": MOVIES_CSV + "40,Two fields\n"}, "movies.csv", 5),
    "movies.csv duplicate": (ml25m, {"movies.csv": MOVIES_CSV + "30,Again,Drama\n"}, "movies.csv", 5),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_malformed_input_names_file_and_line(tmp_path, case):
    make, override, file, line = BAD_INPUTS[case]
    path = make(tmp_path, **override)
    with pytest.raises(DataFormatError) as caught:
        load_dataset(path)
    assert Path(caught.value.path).name == file
    assert caught.value.line == line
    assert file in str(caught.value)
    if line is not None:
        assert f"line {line}:" in str(caught.value)


@pytest.mark.parametrize("missing", ["u.user", "u.item"])
def test_missing_metadata_file(tmp_path, missing):
    path = ml100k(tmp_path)
    (path / missing).unlink()
    with pytest.raises(DataFormatError, match=f"{missing}: file not found"):
        load_dataset(path)


def test_latin1_byte_past_the_sniffed_window(tmp_path):
    # 1 MiB of utf-8 makes the sniffer say utf-8; a latin-1 byte after it must still be caught.
    filler = "".join(f"{i}::Amélie {i} (2001)::Comedy\n" for i in range(100, 60_000))
    assert len(filler.encode()) > 1 << 20
    movies = filler.encode() + b"7::Caf\xe9 (1999)::Drama\n"
    path = write(tmp_path / "ml-10m", {"ratings.dat": RATINGS_DAT, "movies.dat": movies})
    with pytest.raises(DataFormatError) as caught:
        load_dataset(path)
    assert caught.value.line == filler.count("\n") + 1
    assert "movies.dat" in str(caught.value) and "decode" in str(caught.value)


# --- property: garbage lines are always reported by line -----------------------------------

FIELD_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\t\n\r"), max_size=8)
# Letters no float spelling uses ("nan", "inf", "1e5", "0x1f"): always non-numeric.
NON_NUMERIC = st.text(st.sampled_from("ghjklmopqrsuvwyzGHJKLMOPQRSUVWYZ_!?#"), min_size=1, max_size=6)


@st.composite
def garbage_line(draw) -> str:
    if draw(st.booleans()):  # wrong field count (0 fields is an empty line)
        n_fields = draw(st.sampled_from([0, 1, 2, 3, 5, 6, 9]))
        return "\t".join(draw(st.lists(FIELD_TEXT, min_size=n_fields, max_size=n_fields))) if n_fields else ""
    fields = ["7", "10", "3", "880000000"]
    fields[draw(st.integers(0, 3))] = draw(NON_NUMERIC)
    return "\t".join(fields)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.lists(st.tuples(st.integers(0, 4), garbage_line()), min_size=1, max_size=3))
def test_garbage_lines_in_u_data_are_reported_by_line(garbage):
    lines = U_DATA.splitlines()
    for position, text in garbage:
        lines.insert(position, text)
    first_bad = min(i for i, text in enumerate(lines) if text not in U_DATA.splitlines()) + 1
    with tempfile.TemporaryDirectory() as scratch:
        path = ml100k(Path(scratch), **{"u.data": "\n".join(lines) + "\n"})
        with pytest.raises(DataFormatError) as caught:
            load_dataset(path)
    assert caught.value.path.endswith("u.data")
    assert caught.value.line == first_bad
