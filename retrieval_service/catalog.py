"""The item store: items and their vectors by row, with online upserts and deletes (see state.py)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.core.domain import Item


def save_catalog(catalog: pd.DataFrame, path: Path) -> None:
    """Writes the catalog as Parquet; attributes go as JSON text so any key set round-trips."""
    frame = catalog[["item_id", "title", "description", "category"]].copy()
    frame["attributes"] = [json.dumps(a, sort_keys=True) for a in catalog["attributes"]]
    frame.to_parquet(path, index=False)


def load_catalog_items(path: Path) -> list[Item]:
    """Reads the bundle's catalog.parquet back into Items, in row order."""
    frame = pd.read_parquet(path)
    return [
        Item(
            item_id=str(r.item_id),
            title=str(r.title),
            description=str(r.description),
            category=str(r.category),
            attributes=json.loads(str(r.attributes)),
        )
        for r in frame.itertuples(index=False)
    ]


class ItemStore:
    """Rows are append-only (row id == FAISS row); a replaced or deleted item's old row is a tombstone."""

    def __init__(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        if len(items) != len(vectors):
            raise ValueError(f"{len(items)} items but {len(vectors)} vectors")
        self._rows: list[Item | None] = list(items)
        self._row_of: dict[str, int] = {item.item_id: row for row, item in enumerate(items)}
        self._vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        self._size = len(items)

    @property
    def dimension(self) -> int:
        return int(self._vectors.shape[1])

    @property
    def rows(self) -> int:
        """Rows ever stored, tombstones included (== the FAISS index's ntotal)."""
        return self._size

    def __len__(self) -> int:
        return len(self._row_of)

    def item_at(self, row: int) -> Item | None:
        """The live item at a FAISS row, or None for a tombstone."""
        return self._rows[row] if 0 <= row < self._size else None

    def row(self, item_id: str) -> int | None:
        return self._row_of.get(item_id)

    def get(self, item_id: str) -> Item | None:
        row = self._row_of.get(item_id)
        return None if row is None else self._rows[row]

    def vector_at(self, row: int) -> np.ndarray:
        return self._vectors[row]

    def upsert(self, items: Sequence[Item], vectors: np.ndarray) -> int:
        """Appends rows for the items (tombstoning any previous row of the same id); returns first new row."""
        first = self._size
        needed = self._size + len(items)
        if needed > len(self._vectors):
            # Amortised growth: upserts arrive one small batch at a time.
            grown = np.zeros((max(needed, 2 * len(self._vectors)), self.dimension), np.float32)
            grown[: self._size] = self._vectors[: self._size]
            self._vectors = grown
        self._vectors[first:needed] = vectors
        for offset, item in enumerate(items):
            old = self._row_of.get(item.item_id)
            if old is not None:
                self._rows[old] = None
            self._rows.append(item)
            self._row_of[item.item_id] = first + offset
        self._size = needed
        return first

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Tombstones the items; returns (deleted ids, ids that were not present)."""
        deleted, missing = [], []
        for item_id in item_ids:
            row = self._row_of.pop(item_id, None)
            if row is None:
                missing.append(item_id)
            else:
                self._rows[row] = None
                deleted.append(item_id)
        return deleted, missing
