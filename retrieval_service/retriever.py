"""Search over the live catalog: query text/vector and user history → nearest items, with filters."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.domain import Hit, Item, SearchQuery
from recsys.core.errors import InvalidInput
from recsys.core.settings import default
from retrieval_service.catalog import ItemStore, Journal, item_from_record, load_catalog_items
from retrieval_service.encoder import TextEncoder
from retrieval_service.index import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryWeights:
    """How a user's recent items become one query vector."""

    half_life: float = default("history_half_life")  # weight halves every N items back in time
    weight: float = default("history_weight")  # of the history vector next to a text/vector query


class Retriever:
    """Owns encoder, index and item store; safe to call from several threads."""

    def __init__(
        self,
        encoder: TextEncoder,
        index: VectorIndex,
        store: ItemStore,
        journal: Journal | None,
        version: str,
        history: HistoryWeights = HistoryWeights(),
    ) -> None:
        self.encoder = encoder
        self.index = index
        self.store = store
        self.journal = journal
        self.version = version
        self.history = history
        # FAISS add() and search() must not overlap; encoding happens outside the lock.
        self._lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        state_dir: Path | None,
        device: str = "auto",
        history: HistoryWeights = HistoryWeights(),
    ) -> Retriever:
        """Loads a bundle version and replays its journal of online changes (when state_dir is set)."""
        manifest = bundle.manifest
        encoder = TextEncoder.load(
            bundle.file(bundle_files.ENCODER_DIR),
            pooling=manifest["encoder"]["pooling"],
            device=device,
            max_length=manifest["encoder"].get("max_length", 256),
        )
        index = VectorIndex.load(
            bundle.file(bundle_files.INDEX),
            factory=manifest["index"]["factory"],
            device=device,
            nprobe=manifest["index"].get("nprobe", 16),
        )
        items = load_catalog_items(bundle.file(bundle_files.CATALOG))
        vectors = np.load(bundle.file(bundle_files.EMBEDDINGS))
        journal = Journal(state_dir / f"{bundle.version}.journal.jsonl") if state_dir else None
        retriever = cls(encoder, index, ItemStore(items, vectors), journal, bundle.version, history)
        retriever._replay()
        return retriever

    def _replay(self) -> None:
        if self.journal is None:
            return
        count = 0
        for record in self.journal.records():
            if record["op"] == "upsert":
                self._apply_upsert([item_from_record(r) for r in record["items"]])
            else:
                self._apply_delete(record["item_ids"])
            count += 1
        if count:
            log.info("replayed %d journal records from %s", count, self.journal.path)

    # -- queries -------------------------------------------------------------------------------

    def query_vector(self, query: SearchQuery) -> tuple[np.ndarray, list[str]]:
        """The normalised query vector and the history ids the catalog does not know."""
        parts: list[np.ndarray] = []
        if query.vector is not None:
            if query.vector.shape != (self.store.dimension,):
                raise InvalidInput(
                    f"query_vector: expected {self.store.dimension} floats, got {query.vector.size}"
                )
            parts.append(_normalise(query.vector.astype(np.float32)))
        elif query.text:
            parts.append(self.encoder.encode([query.text])[0])
        history, unknown = self.history_vector(query.history_item_ids)
        if history is not None:
            parts.append(history * (self.history.weight if parts else 1.0))
        if not parts:
            raise InvalidInput(
                "query: give query_text, query_vector or history_item_ids"
                + (" (none of the history ids is in the catalog)" if unknown else "")
            )
        return _normalise(np.sum(parts, axis=0)), unknown

    def history_vector(self, item_ids: Sequence[str]) -> tuple[np.ndarray | None, list[str]]:
        """Recency-weighted mean of the known items' vectors (ids most recent first)."""
        vectors, weights, unknown = [], [], []
        with self._lock:
            for position, item_id in enumerate(item_ids):
                row = self.store.row(item_id)
                if row is None:
                    unknown.append(item_id)
                    continue
                vectors.append(self.store.vector_at(row))
                weights.append(0.5 ** (position / self.history.half_life))
        if not vectors:
            return None, unknown
        mean = np.average(np.stack(vectors), axis=0, weights=np.asarray(weights))
        return _normalise(mean), unknown

    def search(self, query: SearchQuery) -> tuple[list[Hit], list[str]]:
        """Top-k live items for the query after filters; also returns unknown history ids."""
        vector, unknown = self.query_vector(query)
        excluded = set(query.exclude_item_ids)
        hits: list[Hit] = []
        with self._lock:
            total = self.index.ntotal
            # Over-fetch, then filter tombstones, exclusions and categories; widen until full.
            fetch = min(total, max(2 * query.top_k, query.top_k + len(excluded) + 16))
            while True:
                scores, rows = self.index.search(vector[None, :], fetch)
                hits = self._filter(scores[0], rows[0], query, excluded)
                if len(hits) >= query.top_k or fetch >= total:
                    break
                fetch = min(total, fetch * 4)
        return hits[: query.top_k], unknown

    def _filter(
        self, scores: np.ndarray, rows: np.ndarray, query: SearchQuery, excluded: set[str]
    ) -> list[Hit]:
        hits = []
        for score, row in zip(scores, rows, strict=True):
            item = self.store.item_at(int(row)) if row >= 0 else None
            if item is None or item.item_id in excluded:
                continue
            if query.categories and item.category not in query.categories:
                continue
            hits.append(
                Hit(
                    item_id=item.item_id,
                    score=float(score),
                    item=item if query.include_text else None,
                    vector=self.store.vector_at(int(row)).copy() if query.include_vectors else None,
                )
            )
        return hits

    def get_items(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        """Known items with their vectors, in request order, and the ids not found."""
        found, missing = [], []
        with self._lock:
            for item_id in item_ids:
                row = self.store.row(item_id)
                if row is None:
                    missing.append(item_id)
                else:
                    item = self.store.item_at(row)
                    assert item is not None
                    found.append((item, self.store.vector_at(row).copy()))
        return found, missing

    # -- online changes ------------------------------------------------------------------------

    def upsert(self, items: Sequence[Item]) -> int:
        """Encodes, journals (durably) and applies the items; visible to the next search."""
        vectors = self.encoder.encode([item.text() for item in items])
        with self._lock:
            if self.journal is not None:
                self.journal.append_upsert(items)
            self._add(items, vectors)
        return len(self.store)

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Journals and tombstones the items; returns (deleted, missing)."""
        with self._lock:
            present = [i for i in item_ids if self.store.row(i) is not None]
            if present and self.journal is not None:
                self.journal.append_delete(present)
            return self.store.delete(item_ids)

    def _apply_upsert(self, items: Sequence[Item]) -> None:
        self._add(items, self.encoder.encode([item.text() for item in items]))

    def _apply_delete(self, item_ids: Sequence[str]) -> None:
        self.store.delete(item_ids)

    def _add(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        self.store.upsert(items, vectors)
        self.index.add(vectors)

    def info(self) -> dict[str, Any]:
        return {
            "size": len(self.store),
            "dimension": self.store.dimension,
            "bundle_version": self.version,
            "index_factory": self.index.factory,
            "device": self.index.device,
            "encoder": self.encoder.name,
            "pooling": self.encoder.pooling,
        }


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
