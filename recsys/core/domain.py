"""Plain data that crosses service boundaries, independent of protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np


@dataclass(frozen=True)
class Item:
    """A catalog item; `text()` is what the encoder and the cross-encoder read."""

    item_id: str
    title: str
    description: str = ""
    category: str = ""
    attributes: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        return item_text(self.title, self.category, self.description)


def item_text(title: str, category: str = "", description: str = "") -> str:
    """The canonical item text: title, then category, then description, skipping blanks."""
    parts = [p.strip() for p in (title, category, description) if p and p.strip()]
    return ". ".join(parts)


@dataclass(frozen=True)
class SearchQuery:
    """A retrieval request after validation."""

    top_k: int
    text: str = ""
    vector: np.ndarray | None = None
    history_item_ids: tuple[str, ...] = ()
    categories: frozenset[str] = frozenset()
    exclude_item_ids: frozenset[str] = frozenset()
    include_text: bool = False
    include_vectors: bool = False
    new_items_only: bool = False  # only items no interaction of the bundle had


@dataclass(frozen=True)
class Hit:
    """One retrieved item. `score` ordered the hits: the dense cosine, or for a hybrid search
    the reciprocal-rank fusion of both retrievers; `found_by` names the retrievers whose lists
    held it, and each retriever's own score is set wherever it could score the item."""

    item_id: str
    score: float
    item: Item | None = None
    vector: np.ndarray | None = None
    dense_score: float | None = None
    lexical_score: float | None = None
    found_by: tuple[str, ...] = ("dense",)


@dataclass(frozen=True)
class HistoryItem:
    item_id: str
    text: str


@dataclass(frozen=True)
class RankContext:
    """Who and what the ranking is for; history is most recent first."""

    query: str = ""
    user_id: str = ""
    history: tuple[HistoryItem, ...] = ()


@dataclass(frozen=True)
class Candidate:
    item_id: str
    text: str
    retrieval_score: float | None = None  # the dense retriever's (cosine)
    lexical_score: float | None = None  # BM25, for a search's candidates


@dataclass(frozen=True)
class Scores:
    """Per-stage scores of one candidate; None marks a stage that did not score it."""

    fused: float
    cross_encoder: float | None = None
    cf: float | None = None
    retrieval: float | None = None
    lexical: float | None = None
    first_pass_rank: int | None = None  # 1-based, before the cross-encoder's reordering


@dataclass(frozen=True)
class Scored:
    item_id: str
    scores: Scores


class DegradedReason(StrEnum):
    """Why an answer is degraded (the `reason` label of recsys_degraded_responses_total)."""

    RANKING_UNAVAILABLE = "ranking_unavailable"
    RANKING_TIMEOUT = "ranking_timeout"
    RANKING_OVERLOADED = "ranking_overloaded"
    RANKING_ERROR = "ranking_error"
    CF_UNAVAILABLE = "cf_unavailable"  # answered and ranked, but without CF's own candidates
