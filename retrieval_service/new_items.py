"""The live products no interaction of the bundle had: added after its build, or never bought.

CF cannot propose them, and the pool's dense half rarely reaches them among the products CF
knows, so a recommendation asks retrieval for the nearest of them on their own
(`SearchQuery.new_items_only`) and the gateway gives the best one a place in its answer
(gateway.candidates.with_new_item). Searched exactly, over their vectors held here: they are
few next to the catalog until the next build learns them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np

from recsys.core.domain import Item
from retrieval_service.backends import CatalogBackend, Found


class NewItems:
    """The ids of the live items outside `interacted`, kept in step with the catalog's changes,
    and their vectors (read from the catalog on the first search after a change)."""

    def __init__(self, interacted: frozenset[str] | None, catalog_ids: Iterable[str]) -> None:
        # None: a bundle without interactions, where every item is new to it.
        self.interacted = interacted
        self._ids = set() if interacted is None else set(catalog_ids) - interacted
        self._held: tuple[list[Item], np.ndarray] | None = None
        self._lock = threading.Lock()

    def added(self, item_ids: Sequence[str]) -> None:
        """Items stored (new, or replaced with a new text and vector)."""
        if self.interacted is None:
            return
        new = [i for i in item_ids if i not in self.interacted]
        if new:
            with self._lock:
                self._ids.update(new)
                self._held = None

    def removed(self, item_ids: Sequence[str]) -> None:
        with self._lock:
            if not self._ids.isdisjoint(item_ids):
                self._ids.difference_update(item_ids)
                self._held = None

    def search(
        self,
        catalog: CatalogBackend,
        vector: np.ndarray,
        top_k: int,
        exclude: frozenset[str] = frozenset(),
        categories: frozenset[str] = frozenset(),
        with_vectors: bool = False,
    ) -> Found:
        """The new items nearest `vector` (inner product), best first, after the filters."""
        if self.interacted is None:
            return catalog.search(vector, top_k, exclude, categories, with_vectors)
        items, vectors = self._vectors(catalog)
        if not items:
            return []
        scores = vectors @ vector
        found: Found = []
        for row in np.argsort(-scores, kind="stable"):
            item = items[row]
            if item.item_id in exclude or (categories and item.category not in categories):
                continue
            found.append((item, float(scores[row]), vectors[row].copy() if with_vectors else None))
            if len(found) == top_k:
                break
        return found

    def _vectors(self, catalog: CatalogBackend) -> tuple[list[Item], np.ndarray]:
        with self._lock:
            if self._held is None:
                stored, _ = catalog.get(sorted(self._ids))
                vectors = (
                    np.stack([v for _, v in stored])
                    if stored
                    else np.zeros((0, catalog.dimension), np.float32)
                )
                self._held = ([item for item, _ in stored], vectors.astype(np.float32))
            return self._held
