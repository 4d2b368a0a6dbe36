"""The Recommend flow: retrieve, rank (or degrade to retrieval order), diversify, cut to k.

Time budget: the caller's remaining deadline (or Settings.default_budget_ms when none was
set) is one clock for the whole request. Retrieval (Search, with GetItems for the history
texts alongside) may use all of it, since without candidates there is no answer; ranking
gets at most `ranking_budget_fraction` of what is left after retrieval, so that a slow
ranking still leaves time to answer, degraded, in retrieval order before the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from gateway.diversity import mmr
from gateway.stages import RankingStage, RankResult, RetrievalStage, SearchResult, within
from recsys import metrics
from recsys.domain import Candidate, HistoryItem, Hit, RankContext, Scores, SearchQuery
from recsys.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, RecsysError
from recsys.settings import Settings

log = logging.getLogger(__name__)

# Ranking needs at least this much time to be worth calling; below it, degrade at once.
MIN_RANKING_BUDGET_S = 0.001
# Ranking's own models; retrieval's bundle_version stays the one reported (it served the items).
RANKING_VERSION_FIELDS = ("cross_encoder", "cf", "fusion")


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


@dataclass(frozen=True)
class Recommendation:
    """Items best first, whether (and why) ranking was skipped, stage seconds and versions."""

    items: list[RecommendedItem]
    degraded: bool = False
    degraded_reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    hit: Hit
    scores: Scores


def degraded_reason(exc: BaseException) -> str:
    """The degraded-reason label (recsys.metrics.DEGRADED_REASONS) of a ranking failure."""
    if isinstance(exc, DeadlineExceeded | TimeoutError):
        return "ranking_timeout"
    if isinstance(exc, NotReady):
        return "ranking_unavailable"
    if isinstance(exc, Overloaded):
        return "ranking_overloaded"
    return "ranking_error"


class RecommendPipeline:
    """Stage-agnostic: the same code runs over gRPC stages and in-process ones."""

    def __init__(
        self, retrieval: RetrievalStage, ranking: RankingStage, settings: Settings
    ) -> None:
        self.retrieval = retrieval
        self.ranking = ranking
        self.settings = settings

    async def recommend(
        self, request: RecommendRequest, deadline_s: float | None
    ) -> Recommendation:
        """Answers within `deadline_s` seconds (None: the default budget); see the module doc."""
        started = time.perf_counter()
        budget = self.settings.default_budget_ms / 1000 if deadline_s is None else deadline_s
        end = started + budget
        timings: dict[str, float] = {}

        search, history = await self._retrieve(request, end)
        timings["retrieval"] = time.perf_counter() - started
        metrics.CANDIDATES.labels(stage="retrieved").observe(len(search.hits))
        versions = {"bundle_version": search.bundle_version, **search.versions}

        t0 = time.perf_counter()
        context = RankContext(query=request.query, user_id=request.user_id, history=history)
        ranked, reason = await self._rank(context, search.hits, end)
        timings["ranking"] = time.perf_counter() - t0
        if ranked is not None:
            entries = _ranked_entries(search.hits, ranked)
            versions |= {n: v for n, v in ranked.versions.items() if n in RANKING_VERSION_FIELDS}
            metrics.CANDIDATES.labels(stage="ranked").observe(len(entries))
        else:
            # Retrieval's order and score; no field pretends ranking scored the item.
            entries = [_Entry(h, Scores(fused=h.score, retrieval=h.score)) for h in search.hits]

        if request.diversity > 0 and len(entries) > 1:
            t0 = time.perf_counter()
            entries = _diversify(entries, request.k, request.diversity)
            timings["diversity"] = time.perf_counter() - t0
        items = [_item(e) for e in entries[: request.k]]
        timings["total"] = time.perf_counter() - started

        metrics.CANDIDATES.labels(stage="returned").observe(len(items))
        for stage, seconds in timings.items():
            metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)
        reasons = [reason] if reason else []
        for r in reasons:
            metrics.DEGRADED.labels(reason=r).inc()
        return Recommendation(items, bool(reasons), reasons, timings, versions)

    async def _retrieve(
        self, request: RecommendRequest, end: float
    ) -> tuple[SearchResult, tuple[HistoryItem, ...]]:
        """Candidates and, concurrently, the history items' texts for the ranking context."""
        remaining = end - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline expired before retrieval could start")
        query = SearchQuery(
            top_k=request.candidate_pool,
            text=request.query,
            history_item_ids=request.history_item_ids,
            categories=request.categories,
            # A recommender should not return what the user already has.
            exclude_item_ids=request.exclude_item_ids | frozenset(request.history_item_ids),
            include_text=True,
            include_vectors=request.diversity > 0,
        )
        if not request.history_item_ids:
            return await within(self.retrieval.search(query, remaining), remaining, "retrieval"), ()
        lookup = asyncio.ensure_future(
            within(
                self.retrieval.get_items(request.history_item_ids, remaining),
                remaining,
                "retrieval",
            )
        )
        try:
            search = await within(self.retrieval.search(query, remaining), remaining, "retrieval")
        except BaseException:
            lookup.cancel()  # nobody will await it: do not leave it running or unretrieved
            raise
        found, _ = await lookup  # unknown history ids are simply not in the context
        return search, tuple(HistoryItem(i.item_id, i.text()) for i in found)

    async def _rank(
        self, context: RankContext, hits: list[Hit], end: float
    ) -> tuple[RankResult | None, str]:
        """Ranking's answer, or (None, degraded reason) when it failed or ran out of time."""
        if not hits:
            return RankResult([], {}), ""
        budget = (end - time.perf_counter()) * self.settings.ranking_budget_fraction
        if budget < MIN_RANKING_BUDGET_S:
            return None, "ranking_timeout"
        candidates = [Candidate(h.item_id, h.item.text() if h.item else "", h.score) for h in hits]
        try:
            # Enforced here too, so a stage that ignores its timeout cannot hold the answer.
            ranked = await within(self.ranking.rank(context, candidates, budget), budget, "ranking")
        except InvalidInput:
            raise
        except RecsysError as exc:
            log.warning("ranking failed, answering in retrieval order: %s", exc)
            return None, degraded_reason(exc)
        except Exception:
            log.exception("ranking raised, answering in retrieval order")
            return None, "ranking_error"
        return ranked, ""


def _ranked_entries(hits: list[Hit], ranked: RankResult) -> list[_Entry]:
    """Hits in fused-score order (stable), keeping only ids retrieval returned."""
    by_id = {h.item_id: h for h in hits}
    entries = [_Entry(by_id[s.item_id], s.scores) for s in ranked.scored if s.item_id in by_id]
    entries.sort(key=lambda e: -e.scores.fused)
    return entries


def _diversify(entries: list[_Entry], k: int, diversity: float) -> list[_Entry]:
    """MMR re-rank of the first k over the whole pool; unchanged when vectors are missing."""
    vectors = [e.hit.vector for e in entries]
    if any(v is None for v in vectors):
        log.warning("diversity asked for but retrieval returned no vectors; relevance order kept")
        return entries
    relevance = np.array([e.scores.fused for e in entries], dtype=np.float64)
    picks = mmr(relevance, np.stack(vectors), k, diversity)  # type: ignore[arg-type]
    return [entries[i] for i in picks]


def _item(entry: _Entry) -> RecommendedItem:
    item = entry.hit.item
    return RecommendedItem(
        item_id=entry.hit.item_id,
        title=item.title if item else "",
        category=item.category if item else "",
        score=entry.scores.fused,
        scores=entry.scores,
        vector=entry.hit.vector,
    )
