"""The Recommend flow: gather candidates, rank (or degrade), diversify, cut to k.

Candidates come from retrieval's Search and, for requests without a query, also from CF
(RankingService.RecallCandidates), concurrently; gateway.candidates says how they mix.

Time budget: the caller's remaining deadline (or Settings.default_budget_ms when none was
set) is one clock for the whole request. Gathering candidates (Search, CF recall, GetItems
for texts) may use all of it, since without candidates there is no answer; ranking gets at
most `ranking_budget_fraction` of what is left after that, so that a slow ranking still
leaves time to answer, degraded, in retrieval order before the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from gateway.candidates import PoolItem, Recalled, merge, pool_split
from gateway.diversity import mmr
from gateway.stages import RankingStage, RankResult, RetrievalStage, SearchResult, within
from recsys import metrics
from recsys.domain import HistoryItem, RankContext, Scores, SearchQuery
from recsys.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    RecsysError,
)
from recsys.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    candidate: PoolItem
    scores: Scores


@dataclass(frozen=True)
class _Pool:
    """What gathering found: candidates, history texts, retrieval's versions, degradations."""

    items: list[PoolItem]
    history: tuple[HistoryItem, ...]
    versions: dict[str, str]
    reasons: list[str]


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

        pool = await self._gather(request, end)
        timings["retrieval"] = time.perf_counter() - started
        versions = dict(pool.versions)

        t0 = time.perf_counter()
        context = RankContext(query=request.query, user_id=request.user_id, history=pool.history)
        ranked, reason = await self._rank(context, pool.items, end)
        timings["ranking"] = time.perf_counter() - t0
        if ranked is not None:
            entries = _ranked_entries(pool.items, ranked)
            versions |= {n: v for n, v in ranked.versions.items() if n in RANKING_VERSION_FIELDS}
            metrics.CANDIDATES.labels(stage="ranked").observe(len(entries))
        else:
            entries = _unranked_entries(pool.items)

        if request.diversity > 0 and len(entries) > 1:
            t0 = time.perf_counter()
            entries = _diversify(entries, request.k, request.diversity)
            timings["diversity"] = time.perf_counter() - t0
        items = [_item(e) for e in entries[: request.k]]
        timings["total"] = time.perf_counter() - started

        metrics.CANDIDATES.labels(stage="returned").observe(len(items))
        for stage, seconds in timings.items():
            metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)
        reasons = pool.reasons + ([reason] if reason else [])
        for r in reasons:
            metrics.DEGRADED.labels(reason=r).inc()
        return Recommendation(items, bool(reasons), reasons, timings, versions)

    async def _gather(self, request: RecommendRequest, end: float) -> _Pool:
        """Search, CF recall and the history items' texts, concurrently, within the deadline."""
        if end - time.perf_counter() <= 0:
            raise DeadlineExceeded("the deadline expired before retrieval could start")
        history_ids = request.history_item_ids
        dense_k, cf_k = pool_split(
            request.candidate_pool,
            has_query=bool(request.query),
            has_history=bool(history_ids),
            cf_share=self.settings.cf_candidate_share,
        )
        # A recommender should not return what the user already has.
        exclude = request.exclude_item_ids | frozenset(history_ids)
        search = lookup = recall = None
        if dense_k:
            query = SearchQuery(
                top_k=dense_k,
                text=request.query,
                history_item_ids=history_ids,
                categories=request.categories,
                exclude_item_ids=exclude,
                include_text=True,
                include_vectors=request.diversity > 0,
            )
            search = _start(self.retrieval.search(query, end - time.perf_counter()), end)
        if history_ids:
            lookup = _start(self.retrieval.get_items(history_ids, end - time.perf_counter()), end)
        if cf_k:
            recall = _start(self._recall(request, cf_k, exclude, end), end, "CF recall")
        tasks = [t for t in (search, lookup, recall) if t is not None]
        try:
            result: SearchResult | None = await search if search is not None else None
            found = (await lookup)[0] if lookup is not None else []
            recalled, reasons = await self._recalled(recall, required=search is None)
        finally:
            for task in tasks:
                task.cancel()  # a failure leaves the others unawaited: stop them
        hits = result.hits if result is not None else []
        metrics.CANDIDATES.labels(stage="retrieved").observe(len(hits))
        metrics.CANDIDATES.labels(stage="recalled").observe(len(recalled))
        versions = {"bundle_version": result.bundle_version, **result.versions} if result else {}
        # Unknown history ids are simply not in the context.
        history = tuple(HistoryItem(item.item_id, item.text()) for item, _ in found)
        return _Pool(merge(hits, recalled), history, versions, reasons)

    async def _recall(
        self, request: RecommendRequest, k: int, exclude: frozenset[str], end: float
    ) -> list[Recalled]:
        """CF's candidates with their items from retrieval; deleted or filtered-out ones dropped."""
        result = await self.ranking.recall(
            request.user_id, request.history_item_ids, k, exclude, end - time.perf_counter()
        )
        scores = dict(result.items)
        found, _ = await self.retrieval.get_items(
            list(scores), end - time.perf_counter(), include_vectors=request.diversity > 0
        )
        return [
            Recalled(item, scores[item.item_id], vector)
            for item, vector in found
            if not request.categories or item.category in request.categories
        ]

    @staticmethod
    async def _recalled(
        recall: asyncio.Future[list[Recalled]] | None, required: bool
    ) -> tuple[list[Recalled], list[str]]:
        """CF's candidates, and ["cf_unavailable"] when CF failed but retrieval answered."""
        if recall is None:
            return [], []
        try:
            return await recall, []
        except Exception as exc:
            if required:
                raise  # CF was the only source: its answer is the request's answer
            if isinstance(exc, NotFound):
                return [], []  # CF knows nothing of this user: no candidates of its own, no fault
            log.warning("CF recall failed, candidates from retrieval only: %r", exc)
            return [], ["cf_unavailable"]

    async def _rank(
        self, context: RankContext, pool: list[PoolItem], end: float
    ) -> tuple[RankResult | None, str]:
        """Ranking's answer, or (None, degraded reason) when it failed or ran out of time."""
        if not pool:
            return RankResult([], {}), ""
        budget = (end - time.perf_counter()) * self.settings.ranking_budget_fraction
        if budget < MIN_RANKING_BUDGET_S:
            return None, "ranking_timeout"
        candidates = [p.candidate() for p in pool]
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


def _start(call: Awaitable[T], end: float, stage: str = "retrieval") -> asyncio.Future[T]:
    """Runs `call` as a task that gives up (DeadlineExceeded) at `end`."""
    return asyncio.ensure_future(within(call, end - time.perf_counter(), stage))


def _ranked_entries(pool: list[PoolItem], ranked: RankResult) -> list[_Entry]:
    """Candidates in fused-score order (stable), keeping only ids the pool held."""
    by_id = {p.item_id: p for p in pool}
    entries = [_Entry(by_id[s.item_id], s.scores) for s in ranked.scored if s.item_id in by_id]
    entries.sort(key=lambda e: -e.scores.fused)
    return entries


def _unranked_entries(pool: list[PoolItem]) -> list[_Entry]:
    """Without ranking: retrieval's order and score, or CF's when retrieval proposed nothing.

    No field pretends ranking scored an item, and the two sources' scores are never mixed.
    """
    retrieved = [
        _Entry(p, Scores(p.retrieval_score, retrieval=p.retrieval_score))
        for p in pool
        if p.retrieval_score is not None
    ]
    return retrieved or [_Entry(p, Scores(p.cf_score or 0.0, cf=p.cf_score)) for p in pool]


def _diversify(entries: list[_Entry], k: int, diversity: float) -> list[_Entry]:
    """MMR re-rank of the first k over the whole pool; unchanged when vectors are missing."""
    vectors = [e.candidate.vector for e in entries]
    if any(v is None for v in vectors):
        log.warning("diversity asked for but retrieval returned no vectors; relevance order kept")
        return entries
    relevance = np.array([e.scores.fused for e in entries], dtype=np.float64)
    picks = mmr(relevance, np.stack(vectors), k, diversity)  # type: ignore[arg-type]
    return [entries[i] for i in picks]


def _item(entry: _Entry) -> RecommendedItem:
    item = entry.candidate.item
    return RecommendedItem(
        item_id=entry.candidate.item_id,
        title=item.title if item else "",
        category=item.category if item else "",
        score=entry.scores.fused,
        scores=entry.scores,
        vector=entry.candidate.vector,
    )
