"""Catalog and interaction ingestion from real CSV, Parquet and JSONL files."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.app.ingest import (
    CATALOG_COLUMNS,
    INTERACTION_COLUMNS,
    catalog_items,
    items_to_frame,
    load_catalog,
    load_interactions,
    read_table,
    write_catalog,
    write_table,
)
from recsys.core.domain import Item
from recsys.core.errors import InvalidInput

CATALOG_ROWS = [
    {
        "item_id": "A1",
        "title": "Red Mug",
        "description": "A mug.",
        "category": "kitchen",
        "price": "9.5",
    },
    {"item_id": "007", "title": "Spy Novel", "description": "", "category": "books", "price": ""},
    {
        "item_id": "B2",
        "title": "Blue Mug",
        "description": "Another mug.",
        "category": "",
        "price": "12",
    },
]


def write(rows: Sequence[Mapping[str, object]], path: Path) -> Path:
    """Writes rows in the format the suffix names, the way a user's tool would."""
    frame = pd.DataFrame(rows)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".parquet":
        frame.to_parquet(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error_of(call: object, *args: object, **kwargs: object) -> str:
    assert callable(call)
    with pytest.raises(InvalidInput) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_catalog_reads_every_format_the_same(tmp_path: Path, suffix: str) -> None:
    catalog = load_catalog(write(CATALOG_ROWS, tmp_path / f"catalog{suffix}"))

    assert tuple(catalog.columns) == CATALOG_COLUMNS
    assert catalog["item_id"].tolist() == ["A1", "007", "B2"]
    assert catalog["title"].tolist() == ["Red Mug", "Spy Novel", "Blue Mug"]
    assert catalog["description"].tolist() == ["A mug.", "", "Another mug."]
    assert catalog["category"].tolist() == ["kitchen", "books", ""]
    # Extra columns become attributes; empty cells are left out rather than kept as "".
    assert catalog["attributes"].tolist() == [{"price": "9.5"}, {}, {"price": "12"}]


def test_catalog_optional_columns_default_and_ids_are_stripped(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title\n  X1 ,  Lamp \n42,Desk\n")

    catalog = load_catalog(path)

    assert catalog["item_id"].tolist() == ["X1", "42"]
    assert catalog["title"].tolist() == ["Lamp", "Desk"]
    assert catalog["description"].tolist() == ["", ""]
    assert catalog["category"].tolist() == ["", ""]
    assert catalog["attributes"].tolist() == [{}, {}]


def test_jsonl_numbers_and_nested_attributes(tmp_path: Path) -> None:
    path = tmp_path / "catalog.jsonl"
    rows = [
        {"item_id": 12, "title": "Tent", "attributes": {"season": "3", "weight_kg": 2.1}},
        {"item_id": 13, "title": "Stove", "in_stock": True},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")

    catalog = load_catalog(path)

    # Integer ids stay "12" even though the second row has no "attributes" key.
    assert catalog["item_id"].tolist() == ["12", "13"]
    assert catalog["attributes"].tolist() == [
        {"season": "3", "weight_kg": "2.1"},
        {"in_stock": "true"},
    ]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_catalog_write_and_items_round_trip(tmp_path: Path, suffix: str) -> None:
    original = load_catalog(write(CATALOG_ROWS, tmp_path / "in.csv"))
    items = catalog_items(original)

    assert items[0] == Item("A1", "Red Mug", "A mug.", "kitchen", {"price": "9.5"})
    assert items_to_frame(items).equals(original)

    write_catalog(original, tmp_path / f"out{suffix}")
    assert load_catalog(tmp_path / f"out{suffix}").equals(original)


def test_items_to_frame_of_nothing_has_the_columns() -> None:
    frame = items_to_frame([])
    assert tuple(frame.columns) == CATALOG_COLUMNS
    assert len(frame) == 0


def test_catalog_missing_required_column_lists_found_columns(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,name\nA,Lamp\n")

    message = error_of(load_catalog, path)

    assert str(path) in message
    assert "'title'" in message
    assert "found: item_id, name" in message


def test_catalog_duplicate_id_names_value_and_both_rows(tmp_path: Path) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text("item_id,title\nA,One\nB,Two\n A ,Three\n")

    message = error_of(load_catalog, path)

    assert message == f"{path} row 3: duplicate item_id 'A' (first at row 1)"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("item_id,title\nA,One\n,Two\n", "row 2: empty item_id"),
        ("item_id,title\nA,One\nB, \n", "row 2: empty title"),
    ],
)
def test_catalog_empty_id_or_title_names_row(tmp_path: Path, body: str, expected: str) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(body)

    assert error_of(load_catalog, path) == f"{path} {expected}"


def test_read_table_errors_name_the_file_and_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    assert error_of(read_table, missing) == f"{missing}: file not found"

    xlsx = tmp_path / "catalog.xlsx"
    xlsx.write_text("whatever")
    assert error_of(read_table, xlsx) == (
        f"{xlsx}: unknown format '.xlsx' (expected .csv, .parquet or .jsonl)"
    )

    for name, content in [
        ("empty.csv", ""),
        ("header.csv", "item_id,title\n"),
        ("blank.jsonl", "\n"),
    ]:
        path = tmp_path / name
        path.write_text(content)
        assert error_of(read_table, path) == f"{path}: empty file (no rows)"

    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    message = error_of(read_table, corrupt)
    assert message.startswith(f"{corrupt}: unreadable Parquet")

    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b\n1,2\n3,4,5,6\n")
    assert error_of(read_table, ragged).startswith(f"{ragged}: unreadable CSV")

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"item_id": "A"}\n{"item_id": \n')
    assert error_of(read_table, bad_json).startswith(f"{bad_json} line 2: invalid JSON")

    not_object = tmp_path / "list.jsonl"
    not_object.write_text("[1, 2]\n")
    assert "line 1: expected a JSON object" in error_of(read_table, not_object)


# -- interactions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_interactions_read_every_format(tmp_path: Path, suffix: str) -> None:
    rows: list[dict[str, object]] = [
        {"user_id": "u1", "item_id": "A1", "timestamp": 1700000000, "weight": 2.5, "query": "mug"},
        {"user_id": "u2", "item_id": "B2", "timestamp": 1700000100, "weight": 1, "query": ""},
    ]
    frame, report = load_interactions(write(rows, tmp_path / f"log{suffix}"))

    assert tuple(frame.columns) == INTERACTION_COLUMNS
    assert frame["user_id"].tolist() == ["u1", "u2"]
    assert frame["item_id"].tolist() == ["A1", "B2"]
    assert frame["timestamp"].dtype == np.int64
    assert frame["timestamp"].tolist() == [1700000000, 1700000100]
    assert frame["weight"].dtype == np.float32
    assert frame["weight"].tolist() == [2.5, 1.0]
    assert frame["query"].tolist() == ["mug", ""]
    assert report.rows == report.kept == 2

    write_table(frame, tmp_path / f"again{suffix}")  # the frame holds just INTERACTION_COLUMNS
    again, _ = load_interactions(tmp_path / f"again{suffix}")
    assert again.equals(frame)


def test_interactions_optional_columns_default_to_file_order(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\nu1,A\nu1,B\nu2,A\n")

    frame, _ = load_interactions(path)

    assert frame["timestamp"].tolist() == [0, 1, 2]
    assert frame["weight"].tolist() == [1.0, 1.0, 1.0]
    assert frame["query"].tolist() == ["", "", ""]


def test_interactions_iso_and_epoch_timestamps_mix(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text(
        "user_id,item_id,timestamp,weight\n"
        "u1,A,2024-03-01T12:00:00Z,\n"
        "u1,B,1709294400.7,3\n"
        "u1,C,2024-03-01T14:00:00+01:00,5\n"
        "u1,D,2024-03-02,1\n"
    )

    frame, _ = load_interactions(path)

    noon = int(datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp())
    midnight = int(datetime(2024, 3, 2, tzinfo=UTC).timestamp())
    assert frame["timestamp"].tolist() == [noon, noon, noon + 3600, midnight]
    # An empty weight cell takes the default.
    assert frame["weight"].tolist() == [1.0, 3.0, 5.0, 1.0]


def test_interactions_parquet_datetime_column(tmp_path: Path) -> None:
    path = tmp_path / "log.parquet"
    pd.DataFrame(
        {
            "user_id": ["u1", "u2"],
            "item_id": ["A", "B"],
            "timestamp": pd.to_datetime(["2024-03-01T12:00:00Z", "2024-03-01T12:00:05Z"]),
        }
    ).to_parquet(path)

    frame, _ = load_interactions(path)

    noon = int(datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp())
    assert frame["timestamp"].tolist() == [noon, noon + 5]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ("u1,A,yesterday,1", "row 2: timestamp 'yesterday' is neither epoch seconds nor ISO 8601"),
        ("u1,A,,1", "row 2: missing timestamp"),
        ("u1,A,5,heavy", "row 2: weight 'heavy' is not a finite number"),
        ("u1,A,5,nan", "row 2: weight 'nan' is not a finite number"),
        (",A,5,1", "row 2: empty user_id"),
        ("u1,,5,1", "row 2: empty item_id"),
    ],
)
def test_interactions_bad_cells_name_row_and_value(tmp_path: Path, row: str, expected: str) -> None:
    path = tmp_path / "log.csv"
    path.write_text(f"user_id,item_id,timestamp,weight\nu0,A,1,1\n{row}\n")

    assert error_of(load_interactions, path) == f"{path} {expected}"


def test_interactions_missing_required_column(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"user": "u1", "item_id": "A"}\n')

    message = error_of(load_interactions, path)

    assert message == f"{path}: missing required column 'user_id' (found: user, item_id)"


def test_unknown_items_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\nu1,A\nu1,X\nu2,B\nu2,Y\nu3,X\nu3,A\n")

    with caplog.at_level(logging.WARNING):
        frame, report = load_interactions(path, known_item_ids={"A", "B"})

    assert frame["item_id"].tolist() == ["A", "B", "A"]
    assert frame["user_id"].tolist() == ["u1", "u2", "u3"]
    # File order survives the drop: the implicit timestamps are the original row positions.
    assert frame["timestamp"].tolist() == [0, 2, 5]
    assert frame.index.tolist() == [0, 1, 2]
    assert (report.rows, report.kept, report.dropped_unknown_items) == (6, 3, 3)
    assert report.unknown_item_examples == ("X", "Y")
    assert "dropped 3 of 6" in caplog.text
    assert "X, Y" in caplog.text


def test_unknown_items_strict_names_first_row(tmp_path: Path) -> None:
    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id\nu1,A\nu1,X\nu2,Y\n")

    message = error_of(load_interactions, path, known_item_ids={"A"}, strict=True)

    assert message == f"{path} row 2: unknown item_id 'X' (not in the catalog)"
