"""Tiny but real stand-ins for the other services, shared by the gateway's pipeline tests.

A bag-of-words cosine search over eight items (TinyRetriever, Retriever's interface) and a
word-overlap ranker with a fixed CF preference (OverlapRanker, Ranker's interface), so every
answer can be checked by hand. They run behind the real Local* stages (recsys.offline.local).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ranking_service.ranker import Recall
from recsys.core.domain import Candidate, Hit, Item, RankContext, Scored, Scores, SearchQuery
from recsys.core.errors import InvalidInput, NotFound

VOCAB = ("running", "shoes", "trail", "coffee", "espresso", "grinder", "tent", "camping", "novel")
CATALOG = [
    Item("r1", "Trail running shoes", category="sport"),
    Item("r2", "Running shoes", category="sport"),
    Item("r3", "Running shoes", description="Red.", category="sport"),
    Item("r4", "Running shoes", description="Blue.", category="sport"),
    Item("c1", "Espresso coffee grinder", category="kitchen"),
    Item("t1", "Camping tent", category="outdoor"),
    Item("t2", "Trail camping tent", category="outdoor"),
    Item("b1", "Running novel", category="books"),
]


def embed(text: str) -> np.ndarray:
    """Bag of words over VOCAB, L2-normalised (all zeros when no word is known)."""
    words = re.findall(r"[a-z]+", text.lower())
    vector = np.array([words.count(w) for w in VOCAB], dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


class TinyRetriever:
    """Exact cosine search with Retriever's interface: search, get_items, version, info.

    Like the real service, GetItems refuses more than `max_ids` ids (None: no limit); every
    get_items call's ids are recorded in `get_items_calls`.
    """

    version = "v-test"

    def __init__(
        self,
        catalog: Iterable[Item] = CATALOG,
        max_ids: int | None = None,
        new: frozenset[str] = frozenset(),
    ) -> None:
        self.items = {item.item_id: item for item in catalog}
        self.new = new  # the products a new_items_only search ranks
        self.vectors = {item_id: embed(item.text()) for item_id, item in self.items.items()}
        self.max_ids = max_ids
        self.queries: list[SearchQuery] = []
        self.get_items_calls: list[list[str]] = []

    def info(self) -> dict[str, Any]:
        return {"bundle_version": self.version, "encoder": "bag-of-words", "index_factory": "Flat"}

    def search(self, query: SearchQuery) -> tuple[list[Hit], list[str]]:
        self.queries.append(query)
        known = [self.vectors[i] for i in query.history_item_ids if i in self.vectors]
        vector = embed(query.text) + (np.mean(known, axis=0) if known else 0.0)
        if not np.any(vector):
            raise InvalidInput("query: give query_text, query_vector or history_item_ids")
        hits = [
            Hit(
                item_id,
                float(vector @ v / np.linalg.norm(vector)),
                self.items[item_id] if query.include_text else None,
                v.copy() if query.include_vectors else None,
                found_by=("new",) if query.new_items_only else ("dense",),
            )
            for item_id, v in self.vectors.items()
            if item_id not in query.exclude_item_ids
            and (not query.categories or self.items[item_id].category in query.categories)
            and (not query.new_items_only or item_id in self.new)
        ]
        hits.sort(key=lambda h: -h.score)
        unknown = [i for i in query.history_item_ids if i not in self.items]
        return hits[: query.top_k], unknown

    def get_items(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        self.get_items_calls.append(list(item_ids))
        if self.max_ids is not None and len(item_ids) > self.max_ids:
            raise InvalidInput(f"item_ids: {len(item_ids)} ids, limit {self.max_ids}")
        found = [(self.items[i], self.vectors[i]) for i in item_ids if i in self.items]
        return found, [i for i in item_ids if i not in self.items]


def retrieval_order(**fields: Any) -> list[str]:
    """The ids TinyRetriever returns for a SearchQuery with these fields."""
    hits, _ = TinyRetriever().search(SearchQuery(**fields))
    return [h.item_id for h in hits]


@dataclass(frozen=True)
class Outcome:
    scored: list[Scored]
    cf_folded_in: bool
    versions: dict[str, str] = field(default_factory=dict)


# The stand-in CF's fixed preference, and the users it was "trained" on.
CF_ORDER = ("b1", "c1", "t2", "r2", "t1", "r3", "r1", "r4")
CF_USERS = frozenset({"u1"})


class OverlapRanker:
    """Ranker's interface: fused = 0.7 · word overlap with the context + 0.3 · retrieval score.

    Its `recall` proposes CF_ORDER to known users and to anyone with a history, leaving out
    what it is told to exclude (recorded in `excludes`).
    """

    def __init__(self) -> None:
        self.versions = {
            "bundle_version": "v-test",
            "cross_encoder": "overlap",
            "cf": "",
            "fusion": "mix",
        }
        self.contexts: list[RankContext] = []
        self.candidates: list[list[Candidate]] = []
        self.recalls: list[tuple[str, tuple[str, ...], int]] = []
        self.excludes: list[frozenset[str]] = []

    def recall(
        self, user_id: str, history: Sequence[str], k: int, exclude: frozenset[str]
    ) -> Recall:
        self.recalls.append((user_id, tuple(history), k))
        self.excludes.append(frozenset(exclude))
        if user_id not in CF_USERS and not history:
            raise NotFound(f"user_id {user_id!r}: unknown to CF")
        skip = exclude | set(history)
        items = [(i, 1.0 - n / 10) for n, i in enumerate(CF_ORDER) if i not in skip]
        return Recall(items[:k], cf_folded_in=user_id not in CF_USERS)

    async def rank(self, context: RankContext, candidates: Sequence[Candidate]) -> Outcome:
        self.contexts.append(context)
        self.candidates.append(list(candidates))
        words = set(
            re.findall(
                r"[a-z]+", " ".join([context.query, *(h.text for h in context.history)]).lower()
            )
        )
        scored = []
        for c in candidates:
            mine = set(re.findall(r"[a-z]+", c.text.lower()))
            ce = len(words & mine) / max(len(words | mine), 1)
            fused = 0.7 * ce + 0.3 * (c.retrieval_score or 0.0)
            scored.append(Scored(c.item_id, Scores(fused, ce, None, c.retrieval_score)))
        scored.sort(key=lambda s: -s.scores.fused)
        return Outcome(scored, cf_folded_in=False, versions=dict(self.versions))
