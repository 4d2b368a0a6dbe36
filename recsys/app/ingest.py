"""Catalog and interaction loading from CSV, Parquet or JSON lines, validated into one schema.

Error messages are one line: the file, then where (`row N` is the 1-based data row, header not
counted, so in a CSV without multi-line cells it sits on line N + 1), then what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.core.domain import Item
from recsys.core.errors import InvalidInput

log = logging.getLogger(__name__)

CATALOG_COLUMNS = ("item_id", "title", "description", "category", "attributes")
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp", "weight", "query")
_CATALOG_TEXT = ("item_id", "title", "description", "category")
_JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
# How many unknown item ids a report and the warning show.
_EXAMPLES = 5


@dataclass(frozen=True)
class IngestReport:
    """What load_interactions read, kept and dropped."""

    rows: int
    kept: int
    dropped_unknown_items: int
    unknown_item_examples: tuple[str, ...]


# -- reading -------------------------------------------------------------------------------------


def read_table(path: Path) -> pd.DataFrame:
    """Reads a CSV, Parquet or JSON-lines file into a frame of raw cells (CSV cells stay text)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet", *_JSON_SUFFIXES):
        raise InvalidInput(
            f"{path}: unknown format '{path.suffix}' (expected .csv, .parquet or .jsonl)"
        )
    if not path.exists():
        raise InvalidInput(f"{path}: file not found")
    if not path.is_file():
        raise InvalidInput(f"{path}: not a file")
    try:
        if suffix == ".csv":
            frame = _read_csv(path)
        elif suffix == ".parquet":
            frame = _read_parquet(path)
        else:
            frame = _read_json_lines(path)
    except (OSError, ValueError, pa.ArrowException, pd.errors.ParserError) as exc:
        raise InvalidInput(f"{path}: unreadable {_format_name(suffix)} ({_one_line(exc)})") from exc
    if frame.empty:
        raise InvalidInput(f"{path}: empty file (no rows)")
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame


def _read_csv(path: Path) -> pd.DataFrame:
    # Every cell as text, nothing turned into NaN: ids like "007" or a title "NA" stay as written.
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        return pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    # Through Python objects so integer ids with nulls do not become floats ("12" not "12.0").
    table = pq.read_table(path)
    return pd.DataFrame(
        {
            name: pd.Series(table.column(name).to_pylist(), dtype=object)
            for name in table.schema.names
        }
    )


def json_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of each non-blank line of a JSON-lines file; InvalidInput naming
    the line for one that is not a JSON object."""
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidInput(f"{path} line {line_no}: invalid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise InvalidInput(f"{path} line {line_no}: expected a JSON object per line")
            yield line_no, record


def _read_json_lines(path: Path) -> pd.DataFrame:
    records = [record for _, record in json_records(path)]
    columns: dict[str, None] = {}
    for record in records:
        columns.update(dict.fromkeys(record))
    return pd.DataFrame(
        {name: pd.Series([r.get(name) for r in records], dtype=object) for name in columns}
    )


def _format_name(suffix: str) -> str:
    return {".csv": "CSV", ".parquet": "Parquet"}.get(suffix, "JSON lines")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


# -- cells ---------------------------------------------------------------------------------------


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell_text(value: object) -> str:
    """One cell as stripped text; missing is "", nested JSON values are dumped back to JSON."""
    if _is_missing(value):
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    return str(value).strip()


def _text_column(frame: pd.DataFrame, name: str) -> list[str]:
    if name not in frame.columns:
        return [""] * len(frame)
    return [_cell_text(v) for v in frame[name].tolist()]


def _require_columns(frame: pd.DataFrame, required: Sequence[str], source: str) -> None:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns)) or "none"
        names = ", ".join(f"'{c}'" for c in missing)
        raise InvalidInput(f"{source}: missing required column {names} (found: {found})")


def _require_non_empty(values: Sequence[str], name: str, source: str) -> None:
    for row, value in enumerate(values, start=1):
        if not value:
            raise InvalidInput(f"{source} row {row}: empty {name}")


# -- catalog -------------------------------------------------------------------------------------


def load_catalog(path: Path) -> pd.DataFrame:
    """Reads and validates a catalog file into item_id, title, description, category, attributes."""
    return catalog_from_frame(read_table(path), str(path))


def catalog_from_frame(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Validates raw catalog cells (from any reader); `source` names the data in error messages."""
    _require_columns(frame, ("item_id", "title"), source)
    text = {name: _text_column(frame, name) for name in _CATALOG_TEXT}
    _require_non_empty(text["item_id"], "item_id", source)
    _require_non_empty(text["title"], "title", source)
    _reject_duplicates(text["item_id"], source)
    out = pd.DataFrame({name: pd.Series(values, dtype=str) for name, values in text.items()})
    out["attributes"] = pd.Series(_attributes(frame), dtype=object)
    return out


def _reject_duplicates(item_ids: Sequence[str], source: str) -> None:
    first_row: dict[str, int] = {}
    for row, item_id in enumerate(item_ids, start=1):
        if item_id in first_row:
            raise InvalidInput(
                f"{source} row {row}: duplicate item_id '{item_id}' (first at row {first_row[item_id]})"
            )
        first_row[item_id] = row


def _attributes(frame: pd.DataFrame) -> list[dict[str, str]]:
    """Every non-schema column as a per-row dict of non-empty text; a nested `attributes` object merges in."""
    extra = [c for c in frame.columns if c not in _CATALOG_TEXT]
    rows: list[dict[str, str]] = [{} for _ in range(len(frame))]
    for name in extra:
        for attrs, value in zip(rows, frame[name].tolist(), strict=True):
            if name == "attributes" and isinstance(value, dict):
                attrs.update(
                    {str(k): _cell_text(v) for k, v in value.items() if not _is_missing(v)}
                )
                continue
            cell = _cell_text(value)
            if cell:
                attrs[str(name)] = cell
    return rows


def catalog_items(catalog: pd.DataFrame) -> list[Item]:
    """The catalog's rows as Items, in row order."""
    return [
        Item(
            item_id=str(item_id),
            title=str(title),
            description=str(description),
            category=str(category),
            attributes=dict(attributes),
        )
        for item_id, title, description, category, attributes in zip(
            catalog["item_id"],
            catalog["title"],
            catalog["description"],
            catalog["category"],
            catalog["attributes"],
            strict=True,
        )
    ]


def items_to_frame(items: Sequence[Item]) -> pd.DataFrame:
    """The inverse of catalog_items: a frame with load_catalog's columns."""
    out = pd.DataFrame(
        {
            "item_id": pd.Series([i.item_id for i in items], dtype=str),
            "title": pd.Series([i.title for i in items], dtype=str),
            "description": pd.Series([i.description for i in items], dtype=str),
            "category": pd.Series([i.category for i in items], dtype=str),
        }
    )
    out["attributes"] = pd.Series([dict(i.attributes) for i in items], dtype=object)
    return out


def write_catalog(catalog: pd.DataFrame, path: Path) -> None:
    """Writes a catalog (load_catalog's columns) as CSV, Parquet or JSONL with attributes as columns."""
    keys = sorted({k for attrs in catalog["attributes"] for k in attrs})
    flat = catalog[list(_CATALOG_TEXT)].copy()
    for key in keys:
        flat[key] = [attrs.get(key, "") for attrs in catalog["attributes"]]
    write_table(flat, path)


# -- interactions --------------------------------------------------------------------------------


def load_interactions(
    path: Path, known_item_ids: Collection[str] | None = None, strict: bool = False
) -> tuple[pd.DataFrame, IngestReport]:
    """Reads and validates an interaction log; rows naming items outside known_item_ids are dropped
    and counted, or with strict=True rejected."""
    return interactions_from_frame(read_table(path), str(path), known_item_ids, strict)


def no_interactions() -> pd.DataFrame:
    """An interaction log without rows, in load_interactions' columns and types."""
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype=str),
            "item_id": pd.Series(dtype=str),
            "timestamp": pd.Series(dtype=np.int64),
            "weight": pd.Series(dtype=np.float64),
            "query": pd.Series(dtype=str),
        }
    )


def interactions_from_frame(
    frame: pd.DataFrame,
    source: str,
    known_item_ids: Collection[str] | None = None,
    strict: bool = False,
) -> tuple[pd.DataFrame, IngestReport]:
    """Validates raw interaction cells (from any reader); `source` names the data in error messages."""
    _require_columns(frame, ("user_id", "item_id"), source)
    users = _text_column(frame, "user_id")
    items = _text_column(frame, "item_id")
    _require_non_empty(users, "user_id", source)
    _require_non_empty(items, "item_id", source)
    out = pd.DataFrame(
        {
            "user_id": pd.Series(users, dtype=str),
            "item_id": pd.Series(items, dtype=str),
            "timestamp": _timestamps(frame, source),
            "weight": _weights(frame, source),
            "query": pd.Series(_text_column(frame, "query"), dtype=str),
        }
    )
    rows = len(out)
    if known_item_ids is None:
        return out, IngestReport(rows, rows, 0, ())
    known = out["item_id"].isin(set(known_item_ids)).to_numpy()
    unknown = out.loc[~known, "item_id"]
    if strict and len(unknown):
        row = int(np.flatnonzero(~known)[0]) + 1
        raise InvalidInput(
            f"{source} row {row}: unknown item_id '{unknown.iloc[0]}' (not in the catalog)"
        )
    examples = tuple(str(i) for i in unknown.drop_duplicates().head(_EXAMPLES))
    if len(unknown):
        log.warning(
            "%s: dropped %d of %d interactions naming items not in the catalog (e.g. %s)",
            source,
            len(unknown),
            rows,
            ", ".join(examples),
        )
    kept = out.loc[known].reset_index(drop=True)
    return kept, IngestReport(rows, len(kept), len(unknown), examples)


def _timestamps(frame: pd.DataFrame, source: str) -> np.ndarray:
    """Epoch seconds (int64) from epoch numbers or ISO 8601 text; without the column, the row order."""
    if "timestamp" not in frame.columns:
        # "Preceding" then still means earlier in the file.
        return np.arange(len(frame), dtype=np.int64)
    values = frame["timestamp"].tolist()
    numeric = _numbers(values)
    out = np.empty(len(values), dtype=np.int64)
    for row, (value, number) in enumerate(zip(values, numeric, strict=True), start=1):
        if isinstance(value, datetime) or not _is_number(value, number):
            out[row - 1] = _parse_time(value, row, source)
        else:
            out[row - 1] = math.floor(number)
    return out


def _numbers(values: list[Any]) -> np.ndarray:
    """The cells as floats (NaN where a cell is not a number), in a writable array."""
    coerced = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce")
    return np.array(coerced, dtype=float)


def _is_number(value: object, number: float) -> bool:
    # Booleans coerce to 0/1 and datetimes to nanoseconds; neither is a number here.
    return math.isfinite(number) and not isinstance(value, bool | datetime)


def _parse_time(value: object, row: int, source: str) -> int:
    if isinstance(value, datetime):
        return _epoch(value)
    text = _cell_text(value)
    if not text:
        raise InvalidInput(f"{source} row {row}: missing timestamp")
    try:
        return _epoch(datetime.fromisoformat(text))
    except ValueError:
        raise InvalidInput(
            f"{source} row {row}: timestamp '{text}' is neither epoch seconds nor ISO 8601"
        ) from None


def _epoch(moment: datetime) -> int:
    # A time without a zone is read as UTC, so the same file gives the same order anywhere.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.floor(moment.timestamp())


def _weights(frame: pd.DataFrame, source: str) -> np.ndarray:
    """float32 weights; a missing cell is 1.0, anything non-numeric or non-finite is an error."""
    if "weight" not in frame.columns:
        return np.ones(len(frame), dtype=np.float32)
    values = frame["weight"].tolist()
    numeric = _numbers(values)
    for row, (value, number) in enumerate(zip(values, numeric, strict=True), start=1):
        if _is_number(value, number):
            continue
        if _cell_text(value) == "":
            numeric[row - 1] = 1.0
            continue
        raise InvalidInput(
            f"{source} row {row}: weight '{_cell_text(value)}' is not a finite number"
        )
    return numeric.astype(np.float32)


# -- writing -------------------------------------------------------------------------------------

_Writer = Callable[[pd.DataFrame, Path], None]


def write_table(frame: pd.DataFrame, path: Path) -> None:
    """Writes a flat frame in the format its suffix names (the formats read_table reads)."""
    path = Path(path)
    suffix = path.suffix.lower()
    writers: dict[str, _Writer] = {
        ".csv": lambda f, p: f.to_csv(p, index=False, lineterminator="\n"),
        ".parquet": lambda f, p: f.to_parquet(p, index=False),
        **dict.fromkeys(
            _JSON_SUFFIXES,
            lambda f, p: f.to_json(p, orient="records", lines=True, force_ascii=False),
        ),
    }
    if suffix not in writers:
        raise InvalidInput(
            f"{path}: unknown format '{path.suffix}' (expected .csv, .parquet or .jsonl)"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    writers[suffix](frame, path)
