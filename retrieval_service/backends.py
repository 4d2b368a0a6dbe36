"""Where a bundle version's items and vectors live while it serves. The Retriever talks to
every backend through `CatalogBackend` and opens one through a `CatalogOpener`; `BACKENDS`
names the module of each `retrieval_backend` setting:

- `faiss` (here): the embedded FAISS index, in this process's memory or on its GPU;
- `milvus` (retrieval_service/milvus.py): a distributed engine, replicas hold no catalog state.

A backend's module defines `opener(settings) -> CatalogOpener`; it is imported only when chosen,
so its client library can be an optional extra. A new backend is such a module, its name here
and in `Settings.retrieval_backend`, and the settings it reads.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.domain import Item
from recsys.core.errors import DataLoss, InvalidInput, first_line
from recsys.core.settings import Settings
from retrieval_service.catalog import ItemStore, load_catalog_items
from retrieval_service.index import VectorIndex
from retrieval_service.lexical import LexicalIndex

# (item, inner product with the query, its vector when asked for) per hit, best first.
Found = list[tuple[Item, float, np.ndarray | None]]


class CatalogBackend(Protocol):
    """A bundle version's live items and vectors: filtered nearest-neighbour search, lookups by
    id and online upserts/deletes. Thread-safe."""

    @property
    def dimension(self) -> int: ...

    def __len__(self) -> int: ...

    def search(
        self,
        vector: np.ndarray,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found: ...

    def lexical_search(
        self,
        text: str,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found:
        """Best BM25 matches of `text` (score: BM25), filtered like `search`; [] where the
        backend has no lexical index."""
        ...

    def lexical_scores(self, text: str, item_ids: Sequence[str]) -> list[float | None]:
        """BM25 of each item for `text` (0.0: no term in common; None: unknown item or no
        lexical index)."""
        ...

    def get(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]: ...

    def upsert(self, items: Sequence[Item], vectors: np.ndarray) -> None: ...

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]: ...

    def info(self) -> dict[str, Any]:
        """At least `index_factory` and `device`, as GetIndexInfo reports them."""
        ...

    def close(self) -> None: ...


class FaissCatalog:
    """The embedded backend: an ItemStore (items and vectors by row), and a FAISS index and a
    lexical index over the same rows; replaced or deleted rows stay in both as tombstones and
    are filtered out."""

    def __init__(
        self, store: ItemStore, index: VectorIndex, lexical: LexicalIndex | None = None
    ) -> None:
        self.store = store
        self.index = index
        self.lexical = lexical if lexical is not None else _lexical_of(store)
        # FAISS add() and search() must not overlap; the lexical index is not thread-safe.
        self._lock = threading.Lock()

    @classmethod
    def open(cls, bundle: Bundle, device: str) -> FaissCatalog:
        manifest = bundle.manifest
        index = VectorIndex.load(
            bundle.file(bundle_files.INDEX),
            factory=manifest["index"]["factory"],
            device=device,
            nprobe=manifest["index"].get("nprobe", 16),
        )
        items = load_catalog_items(bundle.file(bundle_files.CATALOG))
        store = ItemStore(items, np.load(bundle.file(bundle_files.EMBEDDINGS)))
        # Bundles built before the lexical index have no postings file: built here instead.
        lexical_file = bundle.path / bundle_files.LEXICAL
        lexical = LexicalIndex.load(lexical_file) if lexical_file.is_file() else None
        if lexical is not None and lexical.rows != store.rows:
            raise DataLoss(f"{lexical_file}: {lexical.rows} rows, the catalog has {store.rows}")
        return cls(store, index, lexical)

    @property
    def dimension(self) -> int:
        return self.store.dimension

    def __len__(self) -> int:
        return len(self.store)

    def search(
        self,
        vector: np.ndarray,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found:
        with self._lock:
            total = self.index.ntotal
            # Over-fetch, then filter tombstones, exclusions and categories; widen until full.
            fetch = min(total, max(2 * top_k, top_k + len(exclude) + 16))
            while True:
                scores, rows = self.index.search(vector[None, :], fetch)
                found = self._filter(scores[0], rows[0], exclude, categories, with_vectors)
                if len(found) >= top_k or fetch >= total:
                    return found[:top_k]
                fetch = min(total, fetch * 4)

    def lexical_search(
        self,
        text: str,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found:
        with self._lock:
            rows, scores = self.lexical.scores(text)
            found: Found = []
            # The ranked rows are all known: filter them a window at a time until full.
            start, window = 0, top_k + len(exclude) + 16
            while len(found) < top_k and start < len(rows):
                end = start + window
                found += self._filter(
                    scores[start:end], rows[start:end], exclude, categories, with_vectors
                )
                start, window = end, window * 4
            return found[:top_k]

    def lexical_scores(self, text: str, item_ids: Sequence[str]) -> list[float | None]:
        with self._lock:
            rows, scores = self.lexical.scores(text)
            by_row = dict(zip(rows.tolist(), scores.tolist(), strict=True))
            out: list[float | None] = []
            for item_id in item_ids:
                row = self.store.row(item_id)
                out.append(None if row is None else by_row.get(row, 0.0))
            return out

    def _filter(
        self,
        scores: np.ndarray,
        rows: np.ndarray,
        exclude: frozenset[str],
        categories: frozenset[str],
        with_vectors: bool,
    ) -> Found:
        found: Found = []
        for score, row in zip(scores, rows, strict=True):
            item = self.store.item_at(int(row)) if row >= 0 else None
            if item is None or item.item_id in exclude:
                continue
            if categories and item.category not in categories:
                continue
            vector = self.store.vector_at(int(row)).copy() if with_vectors else None
            found.append((item, float(score), vector))
        return found

    def get(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        found, missing = [], []
        with self._lock:
            for item_id in item_ids:
                row = self.store.row(item_id)
                item = None if row is None else self.store.item_at(row)
                if row is None or item is None:
                    missing.append(item_id)
                else:
                    found.append((item, self.store.vector_at(row).copy()))
        return found, missing

    def upsert(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        with self._lock:
            self._unindex([item.item_id for item in items])
            first = self.store.upsert(items, vectors)
            self.index.add(vectors)
            self.lexical.add(first, [item.text() for item in items])
            # An id given twice in one batch: only its last row is live.
            for offset, item in enumerate(items):
                if self.store.item_at(first + offset) is None:
                    self.lexical.remove(first + offset, item.text())

    def delete(self, item_ids: Sequence[str]) -> tuple[list[str], list[str]]:
        with self._lock:
            self._unindex(item_ids)
            return self.store.delete(item_ids)

    def _unindex(self, item_ids: Sequence[str]) -> None:
        """Removes the items' current rows from the lexical index (they become tombstones)."""
        for item_id in item_ids:
            row = self.store.row(item_id)
            item = None if row is None else self.store.item_at(row)
            if row is not None and item is not None:
                self.lexical.remove(row, item.text())

    def info(self) -> dict[str, Any]:
        return {
            "index_factory": self.index.factory,
            "device": self.index.device,
            "lexical": f"bm25 ({self.lexical.vocabulary} terms)",
        }

    def close(self) -> None:
        """Nothing to release: the memory goes with the object."""


def _lexical_of(store: ItemStore) -> LexicalIndex:
    """A lexical index over the store's rows (tombstones included, as rows that do not count)."""
    items = [store.item_at(row) for row in range(store.rows)]
    lexical = LexicalIndex.build([item.text() if item is not None else "" for item in items])
    for row, item in enumerate(items):
        if item is None:
            lexical.remove(row, "")
    return lexical


# Opens a bundle version's catalog on a device ("auto", "cpu", "cuda"): a Retriever opens each
# version it loads, hot-swapped ones included, with the same opener.
CatalogOpener = Callable[[Bundle, str], CatalogBackend]

# retrieval_backend → the module whose `opener(settings)` opens its catalogs (an extra named
# after the backend installs what it imports).
BACKENDS: dict[str, str] = {
    "faiss": "retrieval_service.backends",
    "milvus": "retrieval_service.milvus",
}


def backend_opener(settings: Settings) -> CatalogOpener:
    """The opener of the backend `settings.retrieval_backend` names, set up from the settings."""
    name = settings.retrieval_backend
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as exc:
        raise InvalidInput(
            f"retrieval_backend {name}: {first_line(exc)} (pip install 'recsys[{name}]')"
        ) from None
    return module.opener(settings)


def opener(settings: Settings) -> CatalogOpener:
    """The embedded FAISS backend: nothing to set up."""
    return FaissCatalog.open
