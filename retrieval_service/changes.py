"""One online change of the catalog, the same from the write to every place that keeps it: the
state dir's journal and snapshot (state.py), the shared change log (changelog.py) and a
Retriever applying it (retriever.py, durability.py).

A `Change` is one item's upsert (its fields, and the vector with the identity of the encoder that
made it, when stored) or its delete. One write's changes are stored as one JSON record, the
format of the journal and of the change log's `record` column alike:

- `{"op": "upsert", "items": [...], "encoder": ..., "dimension": D, "vectors": base64 <f4}`;
- `{"op": "delete", "item_ids": [...]}`;
- `{"op": "upsert", "items": [...]}`: written before vectors were journaled (replay re-encodes).

Stored data that does not decode is `DataLoss`, never the caller's `InvalidInput`: it is
logged and counted where it is met (`corrupt`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core import metrics
from recsys.core.domain import Item
from recsys.core.errors import DataLoss, first_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Change:
    """One item's online change: an upsert (`item` set) or a delete (`item` None). An upsert's
    `vector` is stored when known, with `encoder`, the identity of the encoder that made it."""

    item_id: str
    item: Item | None = None
    vector: np.ndarray | None = None
    encoder: str = ""

    @property
    def deleted(self) -> bool:
        return self.item is None


# The latest change per item id (later changes win; an id keeps its first position).
Latest = dict[str, Change]


def upserts(items: Sequence[Item], vectors: np.ndarray, encoder: str) -> list[Change]:
    """The upserts of items with their vectors (one row per item) made by `encoder`."""
    return [
        Change(item.item_id, item, vector, encoder)
        for item, vector in zip(items, vectors, strict=True)
    ]


def deletes(item_ids: Iterable[str]) -> list[Change]:
    return [Change(str(item_id)) for item_id in item_ids]


def fold(changes: Iterable[Change]) -> Latest:
    """The latest change per item id, in order of first appearance."""
    return {change.item_id: change for change in changes}


def with_changes(items: Sequence[Item], latest: Mapping[str, Change]) -> list[Item]:
    """The catalog with the online changes folded in: an upsert replaces its item in place or
    is appended, a delete removes it."""
    out: list[Item] = []
    for item in items:
        change = latest.get(item.item_id)
        if change is None:
            out.append(item)
        elif change.item is not None:
            out.append(change.item)
    known = {item.item_id for item in items}
    return out + [c.item for c in latest.values() if c.item is not None and c.item_id not in known]


# -- the JSON record -----------------------------------------------------------------------------


def to_record(changes: Sequence[Change]) -> dict[str, Any]:
    """One write's changes as a stored record: deletes, or upserts with the vectors of one
    encoder (so replay under that encoder encodes nothing)."""
    if changes and all(change.deleted for change in changes):
        return {"op": "delete", "item_ids": [change.item_id for change in changes]}
    items = [change.item for change in changes if change.item is not None]
    vectors = [change.vector for change in changes if change.vector is not None]
    encoders = {change.encoder for change in changes}
    if (
        not items
        or len(items) != len(changes)
        or len(vectors) != len(changes)
        or len(encoders) != 1
    ):
        raise ValueError("a record holds deletes, or upserts with vectors of one encoder")
    matrix = np.ascontiguousarray(np.stack(vectors), dtype="<f4")
    return {
        "op": "upsert",
        "items": [asdict(item) for item in items],
        "encoder": encoders.pop(),
        "dimension": int(matrix.shape[1]),
        "vectors": base64.b64encode(matrix.tobytes()).decode("ascii"),
    }


def from_record(record: Any, where: str) -> list[Change]:
    """The changes of a stored record; DataLoss naming `where` it came from when it is corrupt."""
    try:
        return _decoded(record)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise corrupt(f"{where}: corrupt record", exc) from None


def _decoded(record: Any) -> list[Change]:
    if not isinstance(record, dict):
        raise TypeError(f"a JSON {type(record).__name__}, not an object")
    if record["op"] == "delete":
        return deletes(_listed(record, "item_ids"))
    if record["op"] != "upsert":
        raise ValueError(f"unknown op {record['op']!r}")
    items = [Item(**fields) for fields in _listed(record, "items")]
    if "vectors" not in record:  # written before vectors were journaled: replay re-encodes
        return [Change(item.item_id, item) for item in items]
    dimension = int(record["dimension"])
    raw = binascii.a2b_base64(record["vectors"], strict_mode=True)  # b64decode's check is slower
    if dimension < 1 or len(raw) != 4 * dimension * len(items):
        raise ValueError(f"{len(raw)} vector bytes for {len(items)} items of dimension {dimension}")
    vectors = np.frombuffer(raw, dtype="<f4").reshape(len(items), dimension)
    return upserts(items, vectors, str(record["encoder"]))


def _listed(record: dict[str, Any], key: str) -> list[Any]:
    """A list field (a string would pass for a list of one-letter ids)."""
    value = record[key]
    if not isinstance(value, list):
        raise TypeError(f"{key} is a JSON {type(value).__name__}, not a list")
    return value


def corrupt(what: str, exc: BaseException) -> DataLoss:
    """The error for stored changes that cannot be read (`what`, and `exc` as its cause), logged
    and counted here: the system wrote them, so no caller is at fault and retrying will not
    help until an operator acts."""
    cause = f"missing {exc}" if isinstance(exc, KeyError) else first_line(exc)
    message = f"{what} ({cause})"
    log.error("%s", message)
    metrics.CORRUPT_RECORDS.inc()
    return DataLoss(message)


def encoder_identity(manifest: Mapping[str, Any]) -> str:
    """A stable id of the encoder a bundle embeds with: pooling, dimension, max length and the
    checksums the manifest records for its encoder files (no file is read)."""
    encoder = manifest["encoder"]
    prefix = bundle_files.ENCODER_DIR + "/"
    files = {k: v for k, v in manifest.get("files", {}).items() if k.startswith(prefix)}
    described = {
        "pooling": encoder.get("pooling"),
        "dimension": encoder.get("dimension"),
        "max_length": encoder.get("max_length", 256),
        # Without recorded checksums the name and source are the best identity there is.
        "files": files or {"name": encoder.get("name"), "source": encoder.get("source")},
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    return f"sha256:{digest[:32]}"
