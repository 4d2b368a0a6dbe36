"""Search over the live catalog: query text/vector and user history → nearest items, with filters.

The Retriever owns a bundle version's encoder and catalog (`CatalogBackend`, opened through a
`CatalogOpener`) and applies online changes to it; where those changes are kept, and how they
reach a version that replaces this one, is its `Durability` (durability.py), chosen when it is
loaded."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.core.bundle import CATALOG, Bundle
from recsys.core.domain import Hit, Item, SearchQuery
from recsys.core.encoder import TextEncoder
from recsys.core.errors import InvalidInput
from recsys.core.scoring import reciprocal_rank_fusion
from recsys.core.settings import default
from retrieval_service.backends import CatalogBackend, CatalogOpener, FaissCatalog, Found
from retrieval_service.catalog import ItemStore
from retrieval_service.changelog import ChangeLog
from retrieval_service.changes import Change, encoder_identity
from retrieval_service.durability import Durability, LocalState, Replay, SharedLog
from retrieval_service.new_items import NewItems

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistoryWeights:
    """How a user's recent items become one query vector."""

    half_life: float = default("history_half_life")  # weight halves every N items back in time
    weight: float = default("history_weight")  # of the history vector next to a text/vector query


@dataclass(frozen=True)
class HybridSettings:
    """How a search with query text retrieves: lexically too, and how both lists merge."""

    lexical: bool = default("lexical_retrieval")
    rrf_k: int = default("hybrid_rrf_k")


class Retriever:
    """Owns encoder and catalog; safe to call from several threads."""

    def __init__(
        self,
        encoder: TextEncoder,
        catalog: CatalogBackend,
        version: str,
        history: HistoryWeights = HistoryWeights(),
        encoder_id: str = "",
        durability: Durability | None = None,
        backend: CatalogOpener = FaissCatalog.open,
        hybrid: HybridSettings = HybridSettings(),
        new_items: NewItems | None = None,
    ) -> None:
        self.encoder = encoder
        self.catalog = catalog
        self.version = version
        self.history = history
        self.hybrid = hybrid
        # Identity of the vectors this version's encoder makes (see changes.encoder_identity).
        self.encoder_id = encoder_id
        # Where online changes are kept (default: in memory only) and what opened the catalog
        # (a successor version is opened the same way).
        self.durability: Durability = durability if durability is not None else LocalState()
        self.backend = backend
        # The live items CF cannot know (default: every item is new, as without interactions).
        self.new_items = new_items if new_items is not None else NewItems(None, ())
        self.replayed = Replay()  # what loading applied
        # Held while a change is recorded and applied (so they keep one order) and across a
        # hot swap's hand-over; searches do not take it (the catalog guards itself).
        self.lock = threading.Lock()

    @classmethod
    def load(
        cls,
        bundle: Bundle,
        state_dir: Path | None,
        device: str = "auto",
        history: HistoryWeights = HistoryWeights(),
        compact_records: int = default("journal_compact_records"),
        change_log: ChangeLog | None = None,
        backend: CatalogOpener = FaissCatalog.open,
        hybrid: HybridSettings = HybridSettings(),
    ) -> Retriever:
        """Loads a bundle version (through `backend`: into FAISS by default) and applies the
        online changes of the shared change log (from the position the version was built at)
        or else those kept in state_dir (when set), whichever bundle version they were made
        under."""
        durability: Durability = (
            SharedLog(change_log)
            if change_log is not None
            else LocalState(state_dir, compact_records)
        )
        return cls.start(bundle, device, history, backend, durability, hybrid)

    @classmethod
    def start(
        cls,
        bundle: Bundle,
        device: str,
        history: HistoryWeights,
        backend: CatalogOpener,
        durability: Durability,
        hybrid: HybridSettings = HybridSettings(),
    ) -> Retriever:
        """Opens a bundle version and applies the changes `durability` keeps."""
        retriever = cls.open(bundle, device, history, backend, durability, hybrid)
        try:
            retriever.replayed = durability.restore(retriever, bundle)
        except BaseException:
            retriever.close()
            raise
        return retriever

    @classmethod
    def open(
        cls,
        bundle: Bundle,
        device: str = "auto",
        history: HistoryWeights = HistoryWeights(),
        backend: CatalogOpener = FaissCatalog.open,
        durability: Durability | None = None,
        hybrid: HybridSettings = HybridSettings(),
    ) -> Retriever:
        """A bundle version's encoder and catalog, without online changes."""
        manifest = bundle.manifest
        encoder = TextEncoder.of_bundle(bundle, device)
        catalog = backend(bundle, device)
        built = pd.read_parquet(bundle.file(CATALOG), columns=["item_id"])["item_id"]
        return cls(
            encoder,
            catalog,
            bundle.version,
            history,
            encoder_identity(manifest),
            durability,
            backend,
            hybrid,
            NewItems(bundle.interacted_item_ids(), built.astype(str)),
        )

    @property
    def store(self) -> ItemStore:
        """The in-memory items and vectors (the embedded FAISS backend only: offline callers)."""
        if not isinstance(self.catalog, FaissCatalog):
            raise TypeError(f"bundle {self.version} is served from {self.catalog.info()}")
        return self.catalog.store

    @property
    def position(self) -> int:
        """The change log position this version has applied through (0: no change log)."""
        return self.durability.position

    # -- queries -------------------------------------------------------------------------------

    def query_vector(self, query: SearchQuery) -> tuple[np.ndarray, list[str]]:
        """The normalised query vector and the history ids the catalog does not know."""
        parts: list[np.ndarray] = []
        if query.vector is not None:
            if query.vector.shape != (self.catalog.dimension,):
                raise InvalidInput(
                    f"query_vector: expected {self.catalog.dimension} floats, got {query.vector.size}"
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
        found, unknown = self.catalog.get(item_ids)
        vector_of = {item.item_id: vector for item, vector in found}
        vectors, weights = [], []
        for position, item_id in enumerate(item_ids):
            if item_id in vector_of:
                vectors.append(vector_of[item_id])
                weights.append(0.5 ** (position / self.history.half_life))
        if not vectors:
            return None, unknown
        mean = np.average(np.stack(vectors), axis=0, weights=np.asarray(weights))
        return _normalise(mean), unknown

    def search(self, query: SearchQuery) -> tuple[list[Hit], list[str]]:
        """Top-k live items for the query after filters; also returns unknown history ids.

        A query with text is hybrid: the dense list and the lexical (BM25) list of the same
        length, merged by reciprocal rank fusion; each hit carries both retrievers' scores."""
        vector, unknown = self.query_vector(query)
        if query.new_items_only:
            return self._new_hits(query, vector), unknown
        lexical_text = query.text if self.hybrid.lexical and query.vector is None else ""
        dense = self.catalog.search(
            vector,
            query.top_k,
            exclude=query.exclude_item_ids,
            categories=query.categories,
            with_vectors=query.include_vectors or bool(lexical_text),
        )
        lexical = (
            self.catalog.lexical_search(
                lexical_text,
                query.top_k,
                exclude=query.exclude_item_ids,
                categories=query.categories,
                with_vectors=True,
            )
            if lexical_text
            else []
        )
        if not lexical:
            hits = _dense_hits(query, dense, ("dense",))
            if lexical_text:
                hits = self._with_lexical_scores(lexical_text, hits)
            return hits, unknown
        return self._fused(query, vector, lexical_text, dense, lexical), unknown

    def _new_hits(self, query: SearchQuery, vector: np.ndarray) -> list[Hit]:
        found = self.new_items.search(
            self.catalog,
            vector,
            query.top_k,
            query.exclude_item_ids,
            query.categories,
            query.include_vectors,
        )
        return _dense_hits(query, found, ("new",))

    def _fused(
        self,
        query: SearchQuery,
        vector: np.ndarray,
        text: str,
        dense: Found,
        lexical: Found,
    ) -> list[Hit]:
        """Both lists merged by reciprocal rank fusion, top_k of them, with each retriever's
        score for every hit (the dense cosine from the stored vector, BM25 recomputed)."""
        found_by: dict[str, list[str]] = {}
        entry: dict[str, tuple[Item, np.ndarray | None]] = {}
        for name, found in (("dense", dense), ("lexical", lexical)):
            for item, _, found_vector in found:
                found_by.setdefault(item.item_id, []).append(name)
                entry.setdefault(item.item_id, (item, found_vector))
        best = reciprocal_rank_fusion(
            [[item.item_id for item, _, _ in found] for found in (dense, lexical)],
            self.hybrid.rrf_k,
        )[: query.top_k]
        bm25 = self.catalog.lexical_scores(text, [item_id for item_id, _ in best])
        hits = []
        for (item_id, fused), lexical_score in zip(best, bm25, strict=True):
            item, found_vector = entry[item_id]
            dense_score = float(vector @ found_vector) if found_vector is not None else None
            hits.append(
                Hit(
                    item_id,
                    fused,
                    item if query.include_text else None,
                    found_vector if query.include_vectors else None,
                    dense_score=dense_score,
                    lexical_score=lexical_score,
                    found_by=tuple(found_by[item_id]),
                )
            )
        return hits

    def _with_lexical_scores(self, text: str, hits: list[Hit]) -> list[Hit]:
        scores = self.catalog.lexical_scores(text, [h.item_id for h in hits])
        return [replace(h, lexical_score=s) for h, s in zip(hits, scores, strict=True)]

    def get_items(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        """Known items with their vectors, in request order, and the ids not found."""
        return self.catalog.get(item_ids)

    # -- online changes ------------------------------------------------------------------------

    def upsert(self, items: Sequence[Item]) -> int:
        """Encodes, stores durably (with the vectors) and applies the items; visible to the next
        search. A version that was switched away from passes the call on to its successor."""
        vectors = self.encoder.encode([item.text() for item in items])
        return self.durability.upsert(self, items, vectors)

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Stores durably and tombstones the items; returns (deleted, missing). A version that
        was switched away from passes the call on to its successor."""
        return self.durability.delete(self, item_ids)

    def catch_up(self) -> Replay:
        """Applies the changes others stored since (the shared change log's new records);
        raises NotReady when the log cannot be read, DataLoss when a record is corrupt."""
        return self.durability.catch_up(self)

    def successor(self, bundle: Bundle, device: str = "auto") -> Retriever:
        """Loads `bundle` with every online change applied, to replace this version; blocking,
        and meant for a worker thread while this version keeps serving and taking writes.

        The caller then makes the new version live; this one keeps answering pinned searches
        (with later changes applied to it too) until it is closed. Nothing acknowledged is
        lost, and searches are never blocked for long (see the Durability in use).
        """
        return self.durability.successor(self, bundle, device)

    def compact(self) -> bool:
        """Folds the online changes into a snapshot; False when there is no state dir or a
        compaction is already running."""
        return self.durability.compact(self)

    def close(self) -> None:
        """Releases what the durability holds (a state dir, for another process to load) and
        the catalog."""
        self.durability.close(self)
        self.catalog.close()

    def info(self) -> dict[str, Any]:
        backend = self.catalog.info()
        return {
            "size": len(self.catalog),
            "dimension": self.catalog.dimension,
            "bundle_version": self.version,
            "index_factory": backend["index_factory"],
            "device": backend["device"],
            "encoder": self.encoder.name,
            "pooling": self.encoder.pooling,
            "lexical": backend.get("lexical", "none") if self.hybrid.lexical else "none",
            **self.durability.info(),
        }

    # -- for the durability: applying changes ----------------------------------------------------

    def put(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        """Stores the items in the catalog (the caller holds the lock)."""
        self.catalog.upsert(items, vectors)
        self.new_items.added([item.item_id for item in items])

    def remove(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Tombstones the items in the catalog (the caller holds the lock): (deleted, missing)."""
        result = self.catalog.delete(item_ids)
        self.new_items.removed(item_ids)
        return result

    def apply(self, latest: Mapping[str, Change]) -> Replay:
        """Applies the latest change per item in one step: stored vectors where this version's
        encoder made them, one batched encoding pass (outside the lock) for the rest."""
        stored: list[Item] = []
        vectors: list[np.ndarray] = []
        stale: list[Item] = []
        deleted: list[str] = []
        for change in latest.values():
            if change.item is None:
                deleted.append(change.item_id)
            elif change.vector is not None and self._reusable(change.vector, change.encoder):
                stored.append(change.item)
                vectors.append(change.vector)
            else:
                stale.append(change.item)
        parts = [np.stack(vectors)] if vectors else []
        if stale:
            parts.append(self.encoder.encode([item.text() for item in stale]))
        with self.lock:
            if parts:
                self.put(stored + stale, np.concatenate(parts))
            if deleted:
                self.remove(deleted)
        return Replay(
            upserts=len(stored) + len(stale),
            deletes=len(deleted),
            stored_vectors=len(stored),
            encoded=len(stale),
        )

    def _reusable(self, vector: np.ndarray, encoder: str) -> bool:
        """Whether a stored vector is what this version's encoder would compute."""
        return encoder == self.encoder_id and vector.shape == (self.catalog.dimension,)

    def present(self, item_ids: Sequence[str]) -> list[str]:
        """The ids the catalog holds, in request order (each once)."""
        _, missing = self.catalog.get(list(dict.fromkeys(item_ids)))
        absent = set(missing)
        return [i for i in dict.fromkeys(item_ids) if i not in absent]

    def capture(self, item_ids: list[str]) -> list[Change]:
        """The live items with their vectors, as upserts (for a snapshot; called under the lock)."""
        found, _ = self.catalog.get(item_ids)
        return [Change(item.item_id, item, vector, self.encoder_id) for item, vector in found]


def _dense_hits(query: SearchQuery, found: Found, found_by: tuple[str, ...]) -> list[Hit]:
    """Hits of one dense list, in its order (its cosine both orders and scores them)."""
    return [
        Hit(
            item.item_id,
            score,
            item if query.include_text else None,
            vector if query.include_vectors else None,
            dense_score=score,
            lexical_score=None,
            found_by=found_by,
        )
        for item, score, vector in found
    ]


def _normalise(vector: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    return (vector / norm).astype(np.float32) if norm > 0 else vector.astype(np.float32)
