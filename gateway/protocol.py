"""The gateway's domain request and answer, independent of protobuf (servicer.py converts)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys.core.domain import DegradedReason, Scores


@dataclass(frozen=True)
class RecommendRequest:
    """A validated Recommend call; history is most recent first."""

    k: int
    candidate_pool: int
    user_id: str = ""
    query: str = ""
    history_item_ids: tuple[str, ...] = ()
    diversity: float = 0.0
    categories: frozenset[str] = frozenset()
    exclude_item_ids: frozenset[str] = frozenset()


@dataclass(frozen=True)
class RecommendedItem:
    """One answer item; `vector` is set only when diversity asked retrieval for vectors."""

    item_id: str
    title: str
    category: str
    score: float
    scores: Scores
    vector: np.ndarray | None = None
    new_product: bool = False  # the pool's new product (CandidatePool.new_item)


@dataclass(frozen=True)
class Recommendation:
    """Items best first, whether (and why) ranking was skipped, stage seconds and versions."""

    items: list[RecommendedItem]
    degraded: bool = False
    degraded_reasons: list[DegradedReason] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
