"""Content similarity of candidates to the request's history, from the bundle's item embeddings.

The language model's view of a recommendation: how close a candidate's text embedding is to
what the user just had. Retrieval's score says this only for the candidates retrieval found
(and mixes the whole history into one vector); these features score every candidate the
bundle's catalog holds, so fusion can weigh content next to CF on CF's candidates too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recsys.core import bundle as bundle_files

# `nearest`: mean similarity to the candidate's NEAREST_OF closest history items (an item-to-item
# neighbour signal that a single odd item cannot carry alone); `recent`: mean similarity to the
# RECENT_OF most recent ones (current taste). How the pair was chosen, and what the build's
# validation gate made of it: docs/architecture.md, "Why these thresholds".
NEAREST_OF = 3
RECENT_OF = 5


@dataclass(frozen=True)
class ContentScores:
    """Per candidate; NaN where the bundle's catalog lacks the candidate (added online)."""

    nearest: np.ndarray
    recent: np.ndarray


class ItemVectors:
    """The bundle's unit-length item embeddings by item id (memory-mapped: the retrieval service
    on the same volume shares the pages)."""

    def __init__(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids for {len(vectors)} vectors")
        self._row = {item_id: row for row, item_id in enumerate(item_ids)}
        self._vectors = vectors

    @classmethod
    def load(cls, version_dir: Path) -> ItemVectors:
        """From a bundle version's (or a build's staging) catalog and embeddings."""
        catalog = pd.read_parquet(version_dir / bundle_files.CATALOG, columns=["item_id"])
        vectors = np.load(version_dir / bundle_files.EMBEDDINGS, mmap_mode="r")
        return cls([str(i) for i in catalog["item_id"]], vectors)

    def scores(self, candidates: Sequence[str], history: Sequence[str]) -> ContentScores | None:
        """Similarities of each candidate to `history` (most recent first); None when the
        catalog knows no history item."""
        past = self._rows(history)
        if not past:
            return None
        known = [
            (k, row) for k, row in enumerate(self._rows_or_none(candidates)) if row is not None
        ]
        nearest = np.full(len(candidates), np.nan, np.float32)
        recent = np.full(len(candidates), np.nan, np.float32)
        if known:
            positions = [k for k, _ in known]
            sims = self._vectors[[r for _, r in known]] @ self._vectors[past].T
            top = min(NEAREST_OF, sims.shape[1])
            nearest[positions] = np.sort(sims, axis=1)[:, -top:].mean(axis=1)
            recent[positions] = sims[:, :RECENT_OF].mean(axis=1)
        return ContentScores(nearest, recent)

    def _rows(self, item_ids: Sequence[str]) -> list[int]:
        return [row for row in self._rows_or_none(item_ids) if row is not None]

    def _rows_or_none(self, item_ids: Sequence[str]) -> list[int | None]:
        return [self._row.get(item_id) for item_id in item_ids]
