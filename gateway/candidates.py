"""The candidate pool: retrieval's hits first, then what only CF recalled.

Retrieval finds items near the request's text or history; CF recalls what users like this one
interacted with, which content similarity misses. Without a query both fill the pool; with a
query only retrieval does (CF still scores every candidate in ranking).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from recsys.domain import Candidate, Hit, Item


@dataclass(frozen=True)
class PoolItem:
    """One candidate; `retrieval_score` is None when only CF proposed it."""

    item_id: str
    item: Item | None
    retrieval_score: float | None
    cf_score: float | None = None
    vector: np.ndarray | None = None

    def candidate(self) -> Candidate:
        return Candidate(self.item_id, self.item.text() if self.item else "", self.retrieval_score)


@dataclass(frozen=True)
class Recalled:
    """An item CF proposed, with its CF score (and vector, when diversity needs one)."""

    item: Item
    cf_score: float
    vector: np.ndarray | None = None


def pool_split(
    pool: int, *, has_query: bool, has_history: bool, cf_share: float
) -> tuple[int, int]:
    """(retrieval top_k, CF top_k) for a pool of `pool` candidates."""
    if has_query:
        return pool, 0
    if not has_history:
        return 0, pool  # a user id alone: only CF can propose anything
    cf = round(pool * cf_share)
    return pool - cf, cf


def merge(hits: Sequence[Hit], recalled: Sequence[Recalled]) -> list[PoolItem]:
    """Retrieval's hits in its order, then CF's items it did not return, in CF's order."""
    pool = [PoolItem(h.item_id, h.item, h.score, vector=h.vector) for h in hits]
    seen = {h.item_id for h in hits}
    pool += [
        PoolItem(r.item.item_id, r.item, None, cf_score=r.cf_score, vector=r.vector)
        for r in recalled
        if r.item.item_id not in seen
    ]
    return pool
