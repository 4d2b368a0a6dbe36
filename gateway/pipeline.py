"""The Recommend flow: gather candidates, rank (or degrade), diversify, place the new product
(gateway.candidates.with_new_item), cut to k.

Candidates come from gateway.candidates (retrieval's Search and, for requests without a
query, CF's RecallCandidates, concurrently); it says how they mix.

Time budget: the caller's remaining deadline (or Settings.default_budget_ms when none was
set) is one clock for the whole request. Gathering candidates (Search, CF recall, GetItems
for texts) may use all of it, since without candidates there is no answer; ranking gets at
most `ranking_budget_fraction` of what is left after that, so that a slow ranking still
leaves time to answer, degraded, in retrieval order before the deadline.

One bundle version answers a request end to end. While a new version rolls out, retrieval and
ranking may briefly serve different ones; each keeps its previous version loaded for a while
and answers calls pinned to it. Ranking (and CF) is pinned to the version retrieval answered
with; when the answers of one gathering disagree, or a pinned service does not hold the
version, the gathering is repeated pinned to a version both hold, within the same budget.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from gateway.candidates import (
    CandidatePool,
    PoolItem,
    PoolPolicy,
    gather_candidates,
    with_new_item,
)
from gateway.diversity import mmr
from gateway.protocol import Recommendation, RecommendedItem, RecommendRequest
from gateway.stages import RankingStage, RankResult, RetrievalStage, within
from recsys.core import metrics
from recsys.core.domain import DegradedReason, Scores
from recsys.core.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotReady,
    Overloaded,
    RecsysError,
    VersionUnavailable,
)
from recsys.core.settings import Settings

log = logging.getLogger(__name__)

# Ranking needs at least this much time to be worth calling; below it, degrade at once.
MIN_RANKING_BUDGET_S = 0.001
# Ranking's own models; retrieval's bundle_version stays the one reported (it served the items).
RANKING_VERSION_FIELDS = ("cross_encoder", "cf", "fusion")
# Gatherings one request may take while the services switch bundle versions: unpinned, pinned
# to a version seen, pinned to the version the refusing service holds.
VERSION_ATTEMPTS = 3


@dataclass(frozen=True)
class _Entry:
    candidate: PoolItem
    scores: Scores


def degraded_reason(exc: BaseException) -> DegradedReason:
    """Why ranking's failure degrades the answer."""
    if isinstance(exc, DeadlineExceeded | TimeoutError):
        return DegradedReason.RANKING_TIMEOUT
    if isinstance(exc, NotReady):
        return DegradedReason.RANKING_UNAVAILABLE
    if isinstance(exc, Overloaded):
        return DegradedReason.RANKING_OVERLOADED
    return DegradedReason.RANKING_ERROR


class RecommendPipeline:
    """Stage-agnostic: the same code runs over gRPC stages and in-process ones."""

    def __init__(
        self, retrieval: RetrievalStage, ranking: RankingStage, settings: Settings
    ) -> None:
        self.retrieval = retrieval
        self.ranking = ranking
        self.settings = settings
        self.policy = PoolPolicy.from_settings(settings)

    async def recommend(
        self, request: RecommendRequest, deadline_s: float | None
    ) -> Recommendation:
        """Answers within `deadline_s` seconds (None: the default budget); see the module doc."""
        started = time.perf_counter()
        budget = self.settings.default_budget_ms / 1000 if deadline_s is None else deadline_s
        end = started + budget
        timings: dict[str, float] = {}

        pool, ranked, reason = await self._one_version(request, end, started, timings)
        metrics.CANDIDATES.labels(stage="retrieved").observe(pool.retrieved)
        metrics.CANDIDATES.labels(stage="recalled").observe(pool.recalled)
        versions = dict(pool.versions)
        if len(pool.bundle_versions) == 1:  # also when only CF and GetItems answered
            versions.setdefault("bundle_version", next(iter(pool.bundle_versions)))
        if ranked is not None:
            entries = _ranked_entries(pool.items, ranked)
            versions |= {n: v for n, v in ranked.versions.items() if n in RANKING_VERSION_FIELDS}
            versions["ranking_bundle_version"] = ranked.versions.get("bundle_version", "")
            metrics.CANDIDATES.labels(stage="ranked").observe(len(entries))
        else:
            entries = _unranked_entries(pool.items)
        if versions.get("bundle_version"):
            metrics.set_bundle_version("gateway", versions["bundle_version"])

        if request.diversity > 0 and len(entries) > 1:
            t0 = time.perf_counter()
            # MMR is quadratic in the pool: off the event loop, like all heavy work.
            entries = await asyncio.to_thread(_diversify, entries, request.k, request.diversity)
            timings["diversity"] = time.perf_counter() - t0
        entries = with_new_item(entries, _entry_id, pool.new_item, pool.new_item_slot)
        items = [_item(e, pool.new_item) for e in entries[: request.k]]
        timings["total"] = time.perf_counter() - started

        metrics.CANDIDATES.labels(stage="returned").observe(len(items))
        for stage, seconds in timings.items():
            metrics.STAGE_DURATION.labels(stage=stage).observe(seconds)
        reasons = pool.reasons + ([reason] if reason is not None else [])
        for r in reasons:
            metrics.DEGRADED.labels(reason=r).inc()
        return Recommendation(items, bool(reasons), reasons, timings, versions)

    async def _one_version(
        self, request: RecommendRequest, end: float, started: float, timings: dict[str, float]
    ) -> tuple[CandidatePool, RankResult | None, DegradedReason | None]:
        """Candidates and ranking's answer, all from one bundle version (see the module doc)."""
        pin, seen = "", set[str]()
        for attempt in range(1, VERSION_ATTEMPTS + 1):
            last = attempt == VERSION_ATTEMPTS
            try:
                pool = await gather_candidates(
                    request, self.retrieval, self.ranking, self.policy, end, pin
                )
            except VersionUnavailable as exc:
                if last:
                    raise _no_common_version(seen | set(exc.held)) from None
                pin = _repin(exc, seen)
                continue
            seen |= pool.bundle_versions
            if len(pool.bundle_versions) > 1:
                if last:
                    raise _no_common_version(pool.bundle_versions)
                # Names `recsys build` gives sort by time: the older one is held on both sides.
                pin = min(pool.bundle_versions)
                continue
            timings["retrieval"] = time.perf_counter() - started
            version = next(iter(pool.bundle_versions), pin)
            t0 = time.perf_counter()
            try:
                ranked, reason = await self._rank(pool, end, version)
            except VersionUnavailable as exc:
                if not last:
                    pin = _repin(exc, seen)
                    continue
                # Answered by retrieval's version alone rather than mixed with another.
                log.warning("ranking does not hold bundle %s; answering unranked: %s", version, exc)
                ranked, reason = None, DegradedReason.RANKING_UNAVAILABLE
            timings["ranking"] = time.perf_counter() - t0
            return pool, ranked, reason
        raise AssertionError("unreachable: the last attempt returns or raises")

    async def _rank(
        self, pool: CandidatePool, end: float, version: str = ""
    ) -> tuple[RankResult | None, DegradedReason | None]:
        """Ranking's answer (pinned to `version`), or (None, degraded reason) when it failed or
        ran out of time; VersionUnavailable when ranking does not hold the version."""
        if not pool.items:
            return RankResult([], {}), None
        budget = (end - time.perf_counter()) * self.settings.ranking_budget_fraction
        if budget < MIN_RANKING_BUDGET_S:
            return None, DegradedReason.RANKING_TIMEOUT
        try:
            # Enforced here too, so a stage that ignores its timeout cannot hold the answer.
            ranked = await within(
                self.ranking.rank(pool.context(), pool.candidates(), budget, version),
                budget,
                "ranking",
            )
        except (InvalidInput, VersionUnavailable):
            raise
        except RecsysError as exc:
            log.warning("ranking failed, answering in retrieval order: %s", exc)
            return None, degraded_reason(exc)
        except Exception:
            log.exception("ranking raised, answering in retrieval order")
            return None, DegradedReason.RANKING_ERROR
        return ranked, None


def _repin(exc: VersionUnavailable, seen: set[str]) -> str:
    """The version to pin the next gathering to: one the refusing service holds, preferably one
    the other service answered with."""
    common = [v for v in exc.held if v in seen]
    return (common or list(exc.held) or [""])[0]


def _no_common_version(versions: set[str] | frozenset[str]) -> NotReady:
    return NotReady(
        "retrieval and ranking are switching bundle versions and hold none in common "
        f"(seen: {', '.join(sorted(versions))}); retry shortly"
    )


def _entry_id(entry: _Entry) -> str:
    return entry.candidate.item_id


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
        _Entry(p, Scores(p.hit_score, retrieval=p.retrieval_score, lexical=p.lexical_score))
        for p in pool
        if p.hit_score is not None
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


def _item(entry: _Entry, new_item: str | None) -> RecommendedItem:
    item = entry.candidate.item
    return RecommendedItem(
        item_id=entry.candidate.item_id,
        title=item.title if item else "",
        category=item.category if item else "",
        score=entry.scores.fused,
        scores=entry.scores,
        vector=entry.candidate.vector,
        new_product=entry.candidate.item_id == new_item,
    )
