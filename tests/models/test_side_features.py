"""Feature columns onto the model's slots: by RecBole type and name, each rule on a few hand-made values."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from slimrec.models.data import DataFormatError
from slimrec.models.side_features import (
    IgnoredColumnsWarning,
    TypedColumn,
    category_text,
    item_features,
    reads_as_sequence,
    token_sets,
    user_features,
)

SOURCE = Path("items.file")


def column(name: str, kind: str, *values) -> TypedColumn:
    return TypedColumn(name, kind, pd.Series(list(values), dtype=object))


def ids(*values: str) -> pd.Series:
    return pd.Series(list(values), dtype=object)


def test_ml1m_item_columns_fill_title_year_and_genres(caplog):
    columns = [
        column("movie_title", "token", "Toy Story", "Heat"),
        column("release_year", "float", "1995", "1995.0"),
        column("genre", "token", "Animation Children's Comedy", "Action Crime Thriller"),
    ]
    with caplog.at_level(logging.INFO, "slimrec.models"):
        items = item_features(SOURCE, ids("Toy Story (1995)", "Heat (1995)"), columns)
    assert list(items["title"]) == ["Toy Story", "Heat"]
    assert list(items["year"]) == [1995, 1995]
    assert list(items["genres"]) == ["Animation|Children's|Comedy", "Action|Crime|Thriller"]
    assert "'genre' read as the genre set (named like a genre)" in caplog.text


def test_the_first_token_seq_column_is_the_genre_set_whatever_its_name():
    columns = [
        column("name", "token_seq", "Toy Story", "Heat"),  # the title, by name, not the genre set
        column("tags", "token_seq", "kids  funny kids", ""),
        column("moods", "token_seq", "happy", "tense"),
    ]
    with pytest.warns(IgnoredColumnsWarning, match=r"moods \(token_seq\)"):
        items = item_features(SOURCE, ids("a", "b"), columns)
    assert list(items["title"]) == ["Toy Story", "Heat"]
    assert list(items["genres"]) == ["kids|funny", ""]  # parts deduplicated, none is ""
    assert list(items["year"]) == [-1, -1]


def test_a_token_column_with_a_small_part_vocabulary_reads_as_a_sequence(caplog):
    # 3 distinct values over 2 parts: a sequence. Titles and cities have more words than values.
    assert reads_as_sequence(pd.Series(["Comedy", "Comedy Drama", "Drama", "Drama"]))
    assert not reads_as_sequence(pd.Series(["Toy Story", "Heat", "Jumanji"]))
    assert not reads_as_sequence(pd.Series(["San Jose", "San Diego", "San Francisco"]))
    assert not reads_as_sequence(pd.Series(["a", "b", "a"]))  # one part each: a plain category
    columns = [column("kind", "token", "Comedy", "Comedy Drama", "Drama")]
    with caplog.at_level(logging.INFO, "slimrec.models"):
        items = item_features(SOURCE, ids("x", "y", "z"), columns)
    assert list(items["genres"]) == ["Comedy", "Comedy|Drama", "Drama"]
    assert "smaller vocabulary" in caplog.text


def test_pipe_separated_parts_and_lists():
    assert list(token_sets(pd.Series(["Sci-Fi|Film Noir", "Drama"]))) == ["Sci-Fi|Film Noir", "Drama"]
    assert list(token_sets(pd.Series([["a", "b"], None, ("c",)]))) == ["a|b", "", "c"]


def test_user_columns_by_name_and_alias_with_the_rest_ignored():
    columns = [
        column("sex", "token", "F", "M"),
        column("age", "float", "25", "56"),
        column("occupation", "float", "10", "16"),  # a code: a category whatever its type
        column("income", "float", "1.5", "2"),
    ]
    with pytest.warns(IgnoredColumnsWarning, match=r"income \(float\); ignored") as caught:
        users = user_features(Path("users.file"), ids("1m_1", "1m_2"), columns)
    assert len(caught) == 1
    assert users.to_dict("list") == {
        "user_id": ["1m_1", "1m_2"],
        "age": [25, 56],
        "gender": ["F", "M"],
        "occupation": ["10", "16"],
        "zip_code": ["", ""],  # missing column: unknown
    }


def test_float_column_holds_numbers_or_nothing_token_column_may_hold_anything():
    with pytest.raises(DataFormatError) as caught:
        user_features(Path("u.file"), ids("a", "b"), [column("age", "float", "30", "thirty")])
    assert (caught.value.line, caught.value.problem) == (3, "age is not a number: 'thirty'")
    users = user_features(Path("u.file"), ids("a", "b", "c"), [column("age", "float", "30", "", None)])
    assert list(users["age"]) == [30, -1, -1]  # empty or missing: unknown
    users = user_features(Path("u.file"), ids("a", "b"), [column("age", "token", "30", "thirty")])
    assert list(users["age"]) == [30, -1]


def test_rows_without_lines_are_named_by_row():
    rowwise = TypedColumn("year", "float", pd.Series([1999.0, np.nan, "soon"], dtype=object), first_line=None)
    with pytest.raises(DataFormatError, match=r"items.file: row 3: year is not a number: 'soon'"):
        item_features(SOURCE, ids("a", "b", "c"), [rowwise])


def test_category_text_keeps_the_spelling_of_numbers():
    assert list(category_text(pd.Series([10.0, np.nan, 3.0]))) == ["10", "", "3"]
    assert list(category_text(pd.Series([1.5, 2.0]))) == ["1.5", "2.0"]
    assert list(category_text(pd.Series(["02134", None], dtype=object))) == ["02134", ""]
