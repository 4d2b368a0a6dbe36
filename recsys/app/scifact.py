"""SciFact (BEIR's retrieval form) as a catalog of abstracts, a query log and test searches.

Abstracts are items (title; the abstract as the description); a claim is a search whose relevant
items are the abstracts it cites. The training claims are the query log a search deployment
learns from (`recsys build --queries`); the test claims are only ever evaluated on.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from recsys.app.ingest import catalog_from_frame, json_records, write_catalog
from recsys.app.movielens import TagQuery, write_queries
from recsys.core.errors import InvalidInput

DATASET = "scifact"
# What `recsys evaluate` reads to know the protocol (the marker every converter writes).
MARKER = "dataset.json"
FILES = ("corpus.jsonl", "train.jsonl", "test.jsonl")


@dataclass(frozen=True)
class ConvertedSciFact:
    catalog: Path
    queries: Path
    test_queries: Path
    items: int
    train_claims: int
    test_claims: int


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, JSON object) of each non-blank line."""
    if not path.is_file():
        raise InvalidInput(f"{path}: file not found")
    return json_records(path)


def _field(record: dict[str, Any], name: str, path: Path, line_no: int) -> Any:
    if name not in record:
        raise InvalidInput(f"{path} line {line_no}: missing field {name!r}")
    return record[name]


def read_corpus(path: Path) -> pd.DataFrame:
    """The abstracts in the catalog's columns (validated as `recsys build` validates it)."""
    rows = []
    for line_no, record in _records(path):
        rows.append(
            {
                "item_id": str(_field(record, "doc_id", path, line_no)),
                "title": str(_field(record, "title", path, line_no)),
                "description": str(_field(record, "text", path, line_no)),
            }
        )
    if not rows:
        raise InvalidInput(f"{path}: no abstracts")
    return catalog_from_frame(pd.DataFrame(rows), str(path))


def read_claims(path: Path, split: str, known: set[str]) -> list[TagQuery]:
    """Claims with their relevant abstracts; a claim citing an abstract the corpus lacks is an
    error (the files come together)."""
    claims = []
    for line_no, record in _records(path):
        text = str(_field(record, "claim", path, line_no)).strip()
        relevant = _field(record, "relevant", path, line_no)
        if not text:
            raise InvalidInput(f"{path} line {line_no}: empty claim")
        if not isinstance(relevant, list) or not relevant:
            raise InvalidInput(f"{path} line {line_no}: 'relevant' must be a non-empty list")
        items = tuple(dict.fromkeys(str(doc) for doc in relevant))
        unknown = [doc for doc in items if doc not in known]
        if unknown:
            raise InvalidInput(
                f"{path} line {line_no}: relevant doc_id {unknown[0]!r} is not in the corpus"
            )
        claims.append(TagQuery(text, items, split))  # type: ignore[arg-type]
    return claims


def convert_scifact(data_dir: Path, out_dir: Path) -> ConvertedSciFact:
    """Writes OUT/catalog.csv, queries.jsonl (training claims), test_queries.jsonl and the
    dataset marker; reads everything first, so bad input writes nothing."""
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    corpus, train_path, test_path = (data_dir / name for name in FILES)
    catalog = read_corpus(corpus)
    known = set(catalog["item_id"])
    train = read_claims(train_path, "train", known)
    test = read_claims(test_path, "test", known)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ConvertedSciFact(
        catalog=out_dir / "catalog.csv",
        queries=out_dir / "queries.jsonl",
        test_queries=out_dir / "test_queries.jsonl",
        items=len(catalog),
        train_claims=len(train),
        test_claims=len(test),
    )
    write_catalog(catalog, files.catalog)
    write_queries(train, files.queries)
    write_queries(test, files.test_queries)
    (out_dir / MARKER).write_text(
        json.dumps({"dataset": DATASET, "source": str(data_dir.resolve())}, indent=2) + "\n"
    )
    return files
