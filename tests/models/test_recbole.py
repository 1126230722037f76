"""RecBole atomic files: awkward ids, other people's feature columns, bad files, and the real ML-1M."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from slimrec.models.data import DataFormatError
from slimrec.models.movielens import detect_format, load_dataset
from slimrec.models.side_features import IgnoredColumnsWarning

SHARED_ML1M = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-1m"

# Ids with a slash, spaces, quotes, percent signs, commas, unicode and a title as an item id.
U1, U2, U3 = "1m_1", "user/2 Zoë", "ü 100% #3?"
I1, I2, I3 = "Toy Story (1995)", "Misérables, Les (1995)", 'Item "3"/b & c'
INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    f"{U1}\t{I1}\t5\t978300760\n{U2}\t{I1}\t3\t978300761\n{U2}\t{I2}\t4\t978300762\n{U3}\t{I3}\t1\t978300763\n"
)
USER = (
    "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token\n"
    f"{U1}\t1\tF\t10\t48067\n{U2}\t56\tM\t16\t70072\n{U3}\t25\tM\t0\t02134\n"
)
ITEM = (
    "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
    f"{I1}\tToy Story\t1995\tAnimation Children's Comedy\n"
    f"{I2}\tMisérables, Les\t1995\tDrama\n"
    f"{I3}\tItem 3\t2001\tComedy Drama\n"
    "Never Rated (1990)\tNever Rated\t1990\tHorror\n"
)


def atomic(tmp_path: Path, name: str = "awkward", **files: str) -> Path:
    """`<name>.inter/.user/.item` (ML-1M's columns unless overridden; None leaves a file out)."""
    directory = tmp_path / name
    directory.mkdir()
    for kind, text in {"inter": INTER, "user": USER, "item": ITEM, **files}.items():
        if text is not None:
            (directory / f"{name}.{kind}").write_text(text, encoding="utf-8")
    return directory


def test_awkward_ids_and_ml1m_columns(tmp_path):
    path = atomic(tmp_path)
    assert detect_format(path) == "atomic"
    ds = load_dataset(path)
    assert ds.name == "awkward"
    assert sorted(ds.users.raw_ids) == sorted([U1, U2, U3])
    assert set(ds.items.raw_ids) == {I1, I2, I3, "Never Rated (1990)"}  # the item file's too
    users = ds.users
    features = zip(users.age, users.occupation, users.zip_code, strict=True)
    by_user = dict(zip(users.raw_ids, features, strict=True))
    assert by_user[U2] == (56, "16", "70072") and by_user[U3] == (25, "0", "02134")
    genres = dict(zip(ds.items.raw_ids, ds.items.genres, strict=True))
    assert genres[I1] == "Animation|Children's|Comedy" and genres[I3] == "Comedy|Drama"
    titles = dict(zip(ds.items.raw_ids, ds.items.title, strict=True))
    assert titles[I2] == "Misérables, Les"
    pairs = zip(ds.interactions.user, ds.interactions.item, strict=True)
    rows = [(ds.users.raw_ids[u], ds.items.raw_ids[i]) for u, i in pairs]
    assert rows == [(U1, I1), (U2, I1), (U2, I2), (U3, I3)]


def test_extra_and_missing_feature_columns(tmp_path):
    user = f"user_id:token\tgender:token\tlast_login:float\n{U1}\tF\t1.5\n{U2}\tM\t2\n"
    item = f"item_id:token\tcategories:token_seq\tprice:float\tblurb:token\n{I1}\tkids fun\t9.99\tA toy.\n"
    path = atomic(tmp_path, user=user, item=item)
    with pytest.warns(IgnoredColumnsWarning) as caught:
        ds = load_dataset(path)
    messages = sorted(str(w.message) for w in caught)
    assert "last_login (float)" in messages[1] and "awkward.user" in messages[1]
    assert "price (float), blurb (token)" in messages[0] and "awkward.item" in messages[0]
    assert list(ds.users.age) == [-1, -1, -1]  # no age column: unknown
    assert ds.users.gender[list(ds.users.raw_ids).index(U3)] == ""  # not in the user file
    assert ds.items.genres[list(ds.items.raw_ids).index(I1)] == "kids|fun"
    assert list(ds.items.year) == [-1, -1, -1]


def test_interactions_alone_and_without_ratings(tmp_path):
    inter = f"item_id:token\tuser_id:token\ttimestamp:float\n{I1}\t{U1}\t5\n{I2}\t{U1}\t6\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to ignore, nothing to warn about
        ds = load_dataset(atomic(tmp_path, inter=inter, user=None, item=None))
    assert list(ds.interactions.rating) == [1.0, 1.0]  # implicit feedback
    assert list(ds.items.genres) == ["", ""] and list(ds.users.gender) == [""]


BAD = {
    "untyped header field": ("inter", "user_id\titem_id:token\ttimestamp:float\n1\t2\t3\n", 1),
    "unknown type": ("item", "item_id:token\tgenre:tags\nx\ty\n", 1),
    "repeated column": ("user", "user_id:token\tage:float\tage:float\nx\t1\t2\n", 1),
    "no timestamp": ("inter", "user_id:token\titem_id:token\trating:float\n1\t2\t3\n", 1),
    "item file without ids": ("item", "movie_title:token\tgenre:token\nx\ty\n", 1),
    "bad timestamp": ("inter", INTER + f"{U1}\t{I2}\t4\tsoon\n", 6),
    "too many fields": ("inter", INTER + f"{U1}\t{I2}\t4\t1\textra\n", 6),
    "empty user id": ("inter", INTER + f"\t{I2}\t4\t1\n", 6),
    "float age not a number": ("user", USER + "u9\told\tF\t1\t1\n", 5),
    "duplicate item id": ("item", ITEM + f"{I2}\tAgain\t1995\tDrama\n", 6),
    "short line": ("inter", INTER + f"{U1}\t{I2}\n" + INTER.splitlines()[1] + "\n", 6),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_name_file_and_line(tmp_path, case):
    kind, text, line = BAD[case]
    path = atomic(tmp_path, **{kind: text})
    with pytest.raises(DataFormatError) as caught:
        load_dataset(path)
    assert Path(caught.value.path).name == f"awkward.{kind}"
    assert caught.value.line == line, str(caught.value)
    assert f"awkward.{kind}, line {line}:" in str(caught.value)


@pytest.mark.skipif(not SHARED_ML1M.is_dir(), reason="shared MovieLens-1M not present")
def test_real_ml1m():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every ML-1M column has a slot
        ds = load_dataset(SHARED_ML1M)
    # ../shared/data/README.md: 6,040 users, 3,706 rated of 3,883 items, 1,000,209 ratings.
    assert (ds.n_users, ds.n_items, len(ds.interactions)) == (6040, 3883, 1_000_209)
    assert len(set(ds.interactions.item.tolist())) == 3706
    toy = list(ds.items.raw_ids).index("Toy Story (1995)")
    assert (ds.items.title[toy], ds.items.year[toy]) == ("Toy Story", 1995)
    assert ds.items.genres[toy] == "Animation|Children's|Comedy"
    genres = {g for gs in ds.items.genres for g in gs.split("|") if g}
    assert len(genres) == 18 and "Film-Noir" in genres
    first = list(ds.users.raw_ids).index("1m_1")
    assert (ds.users.age[first], ds.users.gender[first], ds.users.occupation[first]) == (1, "F", "10")
    assert ds.users.zip_code[first] == "48067"
