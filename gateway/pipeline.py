"""The Recommend flow: retrieve, rank (or degrade to retrieval order), diversify, cut to k."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from gateway.diversity import mmr
from gateway.stages import RankingStage, RankResult, RetrievalStage
from recsys import metrics
from recsys.domain import Candidate, HistoryItem, Hit, RankContext, Scores, SearchQuery
from recsys.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, RecsysError
from recsys.settings import Settings

log = logging.getLogger(__name__)


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
    item_id: str
    title: str
    category: str
    score: float
    scores: Scores


@dataclass(frozen=True)
class Recommendation:
    items: list[RecommendedItem]
    degraded: bool = False
    degraded_reasons: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


def degraded_reason(exc: RecsysError) -> str:
    """Which metric label a ranking failure counts under."""
    if isinstance(exc, DeadlineExceeded):
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
        """Answers within the caller's remaining time (or the default budget when none was set)."""
        started = time.perf_counter()
        budget = deadline_s if deadline_s is not None else self.settings.default_budget_ms / 1000
        end = started + budget
        timings: dict[str, float] = {}

        hits, history, version = await self._retrieve(request, end)
        timings["retrieval"] = time.perf_counter() - started
        metrics.CANDIDATES.labels(stage="retrieved").observe(len(hits))

        t0 = time.perf_counter()
        context = RankContext(query=request.query, user_id=request.user_id, history=history)
        ranked, reason = await self._rank(context, hits, end)
        timings["ranking"] = time.perf_counter() - t0
        versions = {"bundle_version": version}
        if ranked is not None:
            versions |= {k: v for k, v in ranked.versions.items() if v}
            by_id = {h.item_id: h for h in hits}
            ordered = [(by_id[s.item_id], s.scores) for s in ranked.scored if s.item_id in by_id]
            metrics.CANDIDATES.labels(stage="ranked").observe(len(ordered))
        else:
            # Degraded: retrieval's order and score, and nothing pretending to be a ranking score.
            ordered = [(h, Scores(fused=h.score, retrieval=h.score)) for h in hits]

        t0 = time.perf_counter()
        ordered = self._diversify(ordered, request)
        timings["diversity"] = time.perf_counter() - t0
        items = [
            RecommendedItem(
                item_id=hit.item_id,
                title=hit.item.title if hit.item else "",
                category=hit.item.category if hit.item else "",
                score=scores.fused,
                scores=scores,
            )
            for hit, scores in ordered[: request.k]
        ]
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
    ) -> tuple[list[Hit], tuple[HistoryItem, ...], str]:
        """Candidates and, concurrently, the history items' texts for the ranking context."""
        remaining = end - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded("no time left for retrieval")
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
        search = self.retrieval.search(query, timeout=remaining)
        if request.history_item_ids:
            lookup = self.retrieval.get_items(request.history_item_ids, timeout=remaining)
            result, (found, _) = await asyncio.gather(search, lookup)
        else:
            result, found = await search, []
        history = tuple(HistoryItem(i.item_id, i.text()) for i in found)
        return result.hits, history, result.bundle_version

    async def _rank(
        self, context: RankContext, hits: list[Hit], end: float
    ) -> tuple[RankResult | None, str]:
        """Ranking's answer, or (None, reason) when it failed or ran out of time."""
        if not hits:
            return RankResult([], {}), ""
        remaining = (end - time.perf_counter()) * self.settings.ranking_budget_fraction
        if remaining <= 0:
            return None, "ranking_timeout"
        candidates = [Candidate(h.item_id, h.item.text() if h.item else "", h.score) for h in hits]
        try:
            return await self.ranking.rank(context, candidates, timeout=remaining), ""
        except InvalidInput:
            raise
        except TimeoutError:
            return None, "ranking_timeout"
        except RecsysError as exc:
            log.warning("ranking failed, answering in retrieval order: %s", exc)
            return None, degraded_reason(exc)

    def _diversify(
        self, ordered: list[tuple[Hit, Scores]], request: RecommendRequest
    ) -> list[tuple[Hit, Scores]]:
        if request.diversity <= 0 or len(ordered) <= 1:
            return ordered
        vectors = [hit.vector for hit, _ in ordered]
        if any(v is None for v in vectors):
            return ordered
        relevance = np.array([scores.fused for _, scores in ordered], dtype=np.float64)
        picks = mmr(relevance, np.stack(vectors), request.k, request.diversity)  # type: ignore[arg-type]
        return [ordered[i] for i in picks]
