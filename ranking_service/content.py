"""Content similarity of candidates to the request's history, from the bundle's item embeddings.

The language model's view of a recommendation: how close a candidate's text embedding is to
what the user just had. Retrieval's score says this only for the candidates retrieval found
(and mixes the whole history into one vector); these features score every candidate the
bundle's catalog holds, so fusion can weigh content next to CF on CF's candidates too. With the
bundle's text encoder, items the catalog lacks (added online after the build) are embedded from
the text the request carries, so a new product is read the moment it is a candidate.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ranking_service.text_sequence import TextSequence
from recsys.core import bundle as bundle_files
from recsys.core.encoder import TextEncoder

# `nearest`: mean similarity to the candidate's NEAREST_OF closest history items (an item-to-item
# neighbour signal that a single odd item cannot carry alone); `recent`: mean similarity to the
# RECENT_OF most recent ones (current taste). How the pair was chosen, and what the build's
# validation gate made of it: docs/architecture.md, "Why these thresholds".
NEAREST_OF = 3
RECENT_OF = 5
# Embeddings of items added online, kept by (item id, text) so a changed text is read again:
# enough for a day's new products; the oldest is dropped past it.
EMBEDDED_ITEMS = 10_000


@dataclass(frozen=True)
class ContentScores:
    """Per candidate; NaN where the bundle's catalog lacks the candidate (added online) or,
    for `sequence`, where the bundle has no text sequence model."""

    nearest: np.ndarray
    recent: np.ndarray
    # The text sequence model's score of the candidate as what follows the history.
    sequence: np.ndarray


class ItemVectors:
    """The bundle's unit-length item embeddings by item id (memory-mapped: the retrieval service
    on the same volume shares the pages), and, with the bundle's encoder, those of items the
    catalog lacks, embedded from their text; with the bundle's text sequence model."""

    def __init__(
        self,
        item_ids: Sequence[str],
        vectors: np.ndarray,
        encoder: TextEncoder | None = None,
        sequence: TextSequence | None = None,
    ) -> None:
        if len(item_ids) != len(vectors):
            raise ValueError(f"{len(item_ids)} item ids for {len(vectors)} vectors")
        self._row = {item_id: row for row, item_id in enumerate(item_ids)}
        self._vectors = vectors
        self.encoder = encoder
        self.sequence = sequence
        self._embedded: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # ranking computes stage scores in several threads

    @classmethod
    def load(cls, version_dir: Path, encoder: TextEncoder | None = None) -> ItemVectors:
        """From a bundle version's (or a build's staging) catalog, embeddings and text
        sequence model."""
        catalog = pd.read_parquet(version_dir / bundle_files.CATALOG, columns=["item_id"])
        vectors = np.load(version_dir / bundle_files.EMBEDDINGS, mmap_mode="r")
        ids = [str(i) for i in catalog["item_id"]]
        return cls(ids, vectors, encoder, TextSequence.load(version_dir))

    @property
    def matrix(self) -> np.ndarray:
        """The catalog's vectors, in its rows' order."""
        return np.asarray(self._vectors)

    def rows(self, item_ids: Sequence[str]) -> list[int | None]:
        """Each item's row in `matrix`; None for items the catalog lacks."""
        return [self._row.get(i) for i in item_ids]

    def scores(
        self,
        candidates: Sequence[str],
        history: Sequence[str],
        texts: Mapping[str, str] | None = None,
    ) -> ContentScores | None:
        """Similarities of each candidate to `history` (most recent first); None when no history
        item has a vector. Items the catalog lacks are embedded from `texts` (item id → text)
        when there is an encoder, else left out (NaN)."""
        texts = texts or {}
        past = [v for v in self.vectors([*history], texts) if v is not None]
        if not past:
            return None
        found = self.vectors(candidates, texts)
        known = [(k, v) for k, v in enumerate(found) if v is not None]
        out = ContentScores(*(np.full(len(candidates), np.nan, np.float32) for _ in range(3)))
        if known:
            found_matrix, history_matrix = np.stack([v for _, v in known]), np.stack(past)
            sims = found_matrix @ history_matrix.T
            positions = [k for k, _ in known]
            top = min(NEAREST_OF, sims.shape[1])
            out.nearest[positions] = np.sort(sims, axis=1)[:, -top:].mean(axis=1)
            out.recent[positions] = sims[:, :RECENT_OF].mean(axis=1)
            if self.sequence is not None:
                out.sequence[positions] = self.sequence.scores(history_matrix, found_matrix)
        return out

    def vectors(self, item_ids: Sequence[str], texts: Mapping[str, str]) -> list[np.ndarray | None]:
        """Each item's vector: the catalog's, else (with an encoder) one embedded from its text
        in `texts`, else None."""
        out: list[np.ndarray | None] = [
            None if (row := self._row.get(i)) is None else np.asarray(self._vectors[row])
            for i in item_ids
        ]
        if self.encoder is None:
            return out
        wanted = {
            (item_id, texts[item_id])
            for item_id, v in zip(item_ids, out, strict=True)
            if v is None and texts.get(item_id)
        }
        with self._lock:
            cached = {key: self._embedded.get(key) for key in wanted}
        fresh = sorted(key for key, v in cached.items() if v is None)
        if fresh:
            for key, vector in zip(fresh, self.encoder.encode([t for _, t in fresh]), strict=True):
                cached[key] = vector
            with self._lock:
                for key in fresh:
                    self._embedded[key] = cached[key]  # type: ignore[assignment]
                while len(self._embedded) > EMBEDDED_ITEMS:
                    self._embedded.popitem(last=False)
        return [
            v if v is not None or not texts.get(i) else cached.get((i, texts[i]))
            for i, v in zip(item_ids, out, strict=True)
        ]
