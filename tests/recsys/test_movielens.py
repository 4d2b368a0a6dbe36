"""MovieLens conversion against the real ml-latest-small.zip (skipped with a message when absent)."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import zipfile
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from recsys.app.ingest import load_catalog, load_interactions
from recsys.app.movielens import (
    MovieLens,
    TagQuery,
    convert_movielens,
    read_movielens,
    read_queries,
    tag_queries,
)
from recsys.core.domain import item_text
from recsys.core.errors import InvalidInput

pytestmark = pytest.mark.movielens


def raw_rows(zip_path: Path, name: str) -> list[dict[str, str]]:
    """A member of the zip read with the csv module, independently of the code under test."""
    with zipfile.ZipFile(zip_path) as archive:
        member = next(n for n in archive.namelist() if n.endswith("/" + name))
        text = archive.read(member).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@pytest.fixture(scope="module")
def movielens(movielens_zip: Path) -> MovieLens:
    return read_movielens(movielens_zip)


def test_counts_match_the_release(movielens: MovieLens) -> None:
    assert len(movielens.catalog) == 9742
    assert movielens.interactions["user_id"].nunique() == 610
    assert len(movielens.interactions) == 100836


def test_catalog_is_title_and_genres_only(movielens: MovieLens, movielens_zip: Path) -> None:
    movies = raw_rows(movielens_zip, "movies.csv")
    catalog = movielens.catalog

    assert catalog["item_id"].tolist() == [m["movieId"] for m in movies]
    assert catalog["title"].tolist() == [m["title"].strip() for m in movies]
    first = catalog.iloc[0]
    assert (first["title"], first["category"]) == (
        "Toy Story (1995)",
        "Adventure, Animation, Children, Comedy, Fantasy",
    )
    no_genres = {m["movieId"] for m in movies if m["genres"] == "(no genres listed)"}
    assert no_genres
    assert set(catalog.loc[catalog["category"] == "", "item_id"]) == no_genres
    # Tags are the search queries: item text is built from title and genres and nothing else.
    assert (catalog["description"] == "").all()
    assert catalog["attributes"].map(len).sum() == 0
    genre_names = {g for m in movies for g in m["genres"].split("|")} - {"(no genres listed)"}
    for category in catalog["category"]:
        assert set(filter(None, category.split(", "))) <= genre_names


def test_interactions_are_ratings_in_file_order(movielens: MovieLens, movielens_zip: Path) -> None:
    ratings = raw_rows(movielens_zip, "ratings.csv")
    frame = movielens.interactions

    assert frame["user_id"].tolist()[:1000] == [r["userId"] for r in ratings[:1000]]
    assert frame["item_id"].tolist()[-1000:] == [r["movieId"] for r in ratings[-1000:]]
    assert frame["weight"].tolist()[:50] == [float(r["rating"]) for r in ratings[:50]]
    assert frame["timestamp"].tolist()[:50] == [int(r["timestamp"]) for r in ratings[:50]]
    assert (frame["query"] == "").all()
    assert set(frame["item_id"]) <= set(movielens.catalog["item_id"])


def test_queries_follow_the_protocol(movielens: MovieLens, movielens_zip: Path) -> None:
    movies_by_tag: dict[str, set[str]] = defaultdict(set)
    for row in raw_rows(movielens_zip, "tags.csv"):
        tag = row["tag"].strip().lower()
        if tag:
            movies_by_tag[tag].add(row["movieId"])
    expected = {tag: movies for tag, movies in movies_by_tag.items() if len(movies) >= 3}

    queries = movielens.queries
    assert [q.query for q in queries] == sorted(expected)
    assert {q.query: set(q.item_ids) for q in queries} == expected
    # Tags on fewer than three movies are not queries.
    assert any(len(m) < 3 for m in movies_by_tag.values())
    for q in queries:
        first_byte = hashlib.md5(q.query.encode()).digest()[0]
        assert q.split == ("test" if first_byte % 2 == 1 else "train")
    assert {q.split for q in queries} == {"train", "test"}


def test_tag_queries_normalises_and_counts_distinct_movies() -> None:
    tags = pd.DataFrame(
        {
            "userId": ["1", "2", "3", "1", "1", "2", "3", "4"],
            "movieId": ["10", "2", "2", "30", "7", "7", "7", "8"],
            "tag": [" Funny", "funny", "FUNNY ", "funny", "dark", "Dark", "dark ", "dark"],
        }
    )

    queries = tag_queries(tags)

    # "dark" is on two distinct movies only, however many users applied it.
    assert [q.query for q in queries] == ["funny"]
    assert queries[0].item_ids == ("2", "10", "30")
    assert queries[0] == TagQuery(
        "funny",
        ("2", "10", "30"),
        "test" if hashlib.md5(b"funny").digest()[0] % 2 else "train",
    )


def test_convert_round_trips_through_the_loaders(
    movielens: MovieLens, movielens_zip: Path, tmp_path: Path
) -> None:
    files = convert_movielens(movielens_zip, tmp_path / "ml")

    assert (files.items, files.users, files.interactions_count) == (9742, 610, 100836)
    assert files.queries_count == len(movielens.queries)
    catalog = load_catalog(files.catalog)
    assert catalog.equals(movielens.catalog)
    interactions, report = load_interactions(files.interactions, set(catalog["item_id"]))
    assert interactions.equals(movielens.interactions)
    assert report.dropped_unknown_items == 0
    assert read_queries(files.queries) == movielens.queries
    texts = [item_text(t, c) for t, c in zip(catalog["title"], catalog["category"], strict=True)]
    assert texts[0] == "Toy Story (1995). Adventure, Animation, Children, Comedy, Fantasy"


def test_bad_zips_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zip"
    with pytest.raises(InvalidInput, match=f"^{re.escape(str(missing))}: file not found$"):
        read_movielens(missing)

    not_zip = tmp_path / "fake.zip"
    not_zip.write_text("movieId,title\n")
    with pytest.raises(InvalidInput, match=f"^{re.escape(str(not_zip))}: not a readable zip"):
        read_movielens(not_zip)

    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("data/movies.csv", "movieId,title,genres\n1,A,Drama\n")
    with pytest.raises(
        InvalidInput,
        match=f"^{re.escape(str(other))}: not a MovieLens zip \\(no ratings.csv, tags.csv",
    ):
        convert_movielens(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
