"""MovieLens (e.g. ml-latest-small.zip) as a catalog, an interaction log and tag search queries.

Movies are items (text = title + genres), every rating is an implicit interaction weighted by
the rating, and tags become search queries by the protocol in docs: lower-cased, stripped, kept
when applied to >= 3 distinct movies, split by the first byte of md5(tag). Tags never enter
item text: they are the queries, and item text containing them would leak the answers.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

from recsys.app.ingest import (
    catalog_from_frame,
    interactions_from_frame,
    write_catalog,
    write_table,
)
from recsys.core.errors import InvalidInput

Split = Literal["train", "test"]
# A tag becomes a query only when this many distinct movies carry it.
MIN_MOVIES_PER_TAG = 3
_NO_GENRES = "(no genres listed)"


@dataclass(frozen=True)
class TagQuery:
    """A search query (a normalised tag) and the movies relevant to it."""

    query: str
    item_ids: tuple[str, ...]
    split: Split


@dataclass(frozen=True)
class MovieLens:
    """The data set in the ingestion schema: load_catalog's and load_interactions' columns."""

    catalog: pd.DataFrame
    interactions: pd.DataFrame
    queries: list[TagQuery]


@dataclass(frozen=True)
class ConvertedFiles:
    """What convert_movielens wrote, with counts for the summary line."""

    catalog: Path
    interactions: Path
    queries: Path
    items: int
    users: int
    interactions_count: int
    queries_count: int


def read_movielens(zip_path: Path) -> MovieLens:
    """Reads movies.csv, ratings.csv and tags.csv from a MovieLens zip, validated like any input."""
    zip_path = Path(zip_path)
    movies, ratings, tags = _read_members(zip_path)
    catalog = catalog_from_frame(_movies_to_catalog(movies), f"{zip_path}:movies.csv")
    interactions, _ = interactions_from_frame(
        _ratings_to_interactions(ratings), f"{zip_path}:ratings.csv"
    )
    return MovieLens(catalog, interactions, tag_queries(tags))


def _read_members(zip_path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    if not zip_path.is_file():
        raise InvalidInput(f"{zip_path}: file not found")
    wanted = {
        "movies.csv": ("movieId", "title", "genres"),
        "ratings.csv": ("userId", "movieId", "rating", "timestamp"),
        "tags.csv": ("userId", "movieId", "tag"),
    }
    try:
        with zipfile.ZipFile(zip_path) as archive:
            # The members sit in a folder named for the release (ml-latest-small/, ml-25m/ ...).
            members = {Path(n).name: n for n in archive.namelist() if Path(n).name in wanted}
            missing = sorted(set(wanted) - set(members))
            if missing:
                raise InvalidInput(
                    f"{zip_path}: not a MovieLens zip (no {', '.join(missing)} in it)"
                )
            frames = {}
            for name, columns in wanted.items():
                with archive.open(members[name]) as handle:
                    frame = pd.read_csv(handle, dtype=str, keep_default_na=False)
                absent = [c for c in columns if c not in frame.columns]
                if absent:
                    raise InvalidInput(
                        f"{zip_path}: not a MovieLens zip ({name} lacks {', '.join(absent)})"
                    )
                frames[name] = frame
    except (zipfile.BadZipFile, OSError, ValueError, pd.errors.ParserError) as exc:
        raise InvalidInput(
            f"{zip_path}: not a readable zip ({' '.join(str(exc).split())})"
        ) from exc
    return frames["movies.csv"], frames["ratings.csv"], frames["tags.csv"]


def _movies_to_catalog(movies: pd.DataFrame) -> pd.DataFrame:
    genres = movies["genres"].str.strip()
    return pd.DataFrame(
        {
            "item_id": movies["movieId"],
            "title": movies["title"],
            "description": "",
            "category": genres.where(genres != _NO_GENRES, "").str.replace("|", ", "),
        }
    )


def _ratings_to_interactions(ratings: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": ratings["userId"],
            "item_id": ratings["movieId"],
            "timestamp": ratings["timestamp"],
            "weight": ratings["rating"],
        }
    )


def tag_queries(tags: pd.DataFrame) -> list[TagQuery]:
    """Queries from MovieLens tags (columns movieId, tag) by the evaluation protocol, sorted by query."""
    normalised = pd.DataFrame(
        {
            "query": tags["tag"].astype(str).str.strip().str.lower(),
            "item_id": tags["movieId"].astype(str).str.strip(),
        }
    )
    normalised = normalised[normalised["query"] != ""].drop_duplicates()
    queries = []
    for query, group in normalised.groupby("query", sort=True):
        item_ids = sorted(group["item_id"], key=_id_order)
        if len(item_ids) >= MIN_MOVIES_PER_TAG:
            queries.append(TagQuery(str(query), tuple(item_ids), query_split(str(query))))
    return queries


def query_split(query: str) -> Split:
    """The protocol's split: test when the first byte of md5(query) is odd, else train."""
    return "test" if hashlib.md5(query.encode()).digest()[0] % 2 else "train"


def _id_order(item_id: str) -> tuple[int, str]:
    # Numeric ids in numeric order (movieId 2 before 10), anything else after, as text.
    return (int(item_id), "") if item_id.isdigit() else (1 << 62, item_id)


def write_queries(queries: list[TagQuery], path: Path) -> None:
    """Writes queries as JSON lines: {"query": ..., "item_ids": [...], "split": ...}."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for q in queries:
            record = {"query": q.query, "item_ids": list(q.item_ids), "split": q.split}
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def read_queries(path: Path) -> list[TagQuery]:
    """Reads a queries.jsonl written by write_queries (or by hand in the same shape)."""
    if not Path(path).is_file():
        raise InvalidInput(f"{path}: file not found")
    queries = []
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                split = record.get("split", "train")
                if split not in ("train", "test"):
                    raise ValueError(f"split must be 'train' or 'test', not {split!r}")
                queries.append(
                    TagQuery(str(record["query"]), tuple(map(str, record["item_ids"])), split)
                )
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InvalidInput(f"{path} line {line_no}: bad query record ({exc})") from exc
    return queries


def convert_movielens(zip_path: Path, out_dir: Path) -> ConvertedFiles:
    """Writes out_dir/catalog.csv, interactions.csv and queries.jsonl; reads everything first, so a
    bad zip writes nothing."""
    data = read_movielens(zip_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ConvertedFiles(
        catalog=out_dir / "catalog.csv",
        interactions=out_dir / "interactions.csv",
        queries=out_dir / "queries.jsonl",
        items=len(data.catalog),
        users=int(data.interactions["user_id"].nunique()),
        interactions_count=len(data.interactions),
        queries_count=len(data.queries),
    )
    write_catalog(data.catalog, files.catalog)
    write_table(data.interactions, files.interactions)
    write_queries(data.queries, files.queries)
    return files
