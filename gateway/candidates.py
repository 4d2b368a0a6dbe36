"""The candidate pool: the one place that decides what ranking is shown for a request.

Serving (gateway.pipeline), fusion fitting and cross-encoder negative mining (recsys build) and
`recsys evaluate` all call `gather_candidates`, over gRPC stages or in-process ones
(recsys.offline.local), so offline numbers describe the pool that serves.

Sources: retrieval finds items near the request's text or history; CF recalls what users like
this one interacted with, which content similarity misses. With a query only retrieval fills
the pool (CF still scores every candidate in ranking); without one, retrieval fills
`1 - cf_share` of it and CF the rest; a user id alone is answered from CF. Order: retrieval's
hits in its order, then CF's items retrieval did not return, in CF's order. Exclusions: the
request's history and exclusions (CF also leaves out what a known user had at training).

New products: neither source reaches a product no interaction of the bundle had (CF cannot
know it; among the products CF knows, the dense half rarely ranks it high enough). So a
recommendation (a history, no query) also asks retrieval for the nearest such product, which
joins the pool, and `with_new_item` keeps a position in the answer for it when ranking placed it
lower: the first one when it is very near the most recent item (`new_item_lead_similarity`),
`new_item_slot` when near (`new_item_min_similarity`), none when farther.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from gateway.protocol import RecommendRequest
from gateway.stages import RankingStage, RetrievalStage, SearchResult, within
from recsys.core.domain import (
    Candidate,
    DegradedReason,
    HistoryItem,
    Hit,
    Item,
    RankContext,
    SearchQuery,
)
from recsys.core.errors import DeadlineExceeded, InvalidInput, NotFound, VersionUnavailable
from recsys.core.settings import Settings, default

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class PoolPolicy:
    """How pools are mixed and bounded; serving takes it from Settings, builds from options."""

    cf_share: float = default("cf_candidate_share")
    max_text_chars: int = default("max_text_chars")  # longer item texts are cut, never refused
    max_ids_per_call: int = default("max_k")  # retrieval refuses larger GetItems calls
    new_item_slot: int = default("new_item_slot")
    new_item_min_similarity: float = default("new_item_min_similarity")
    new_item_lead_similarity: float = default("new_item_lead_similarity")

    @classmethod
    def from_settings(cls, settings: Settings) -> PoolPolicy:
        return cls(
            settings.cf_candidate_share,
            settings.max_text_chars,
            settings.max_k,
            settings.new_item_slot,
            settings.new_item_min_similarity,
            settings.new_item_lead_similarity,
        )


@dataclass(frozen=True)
class PoolItem:
    """One candidate; `retrieval_score` (dense) is None when only CF proposed it,
    `lexical_score` (BM25) unless it is a search's candidate."""

    item_id: str
    item: Item | None
    retrieval_score: float | None
    cf_score: float | None = None
    vector: np.ndarray | None = None
    lexical_score: float | None = None
    hit_score: float | None = None  # what ordered retrieval's hits (hybrid: the fused rank)


@dataclass(frozen=True)
class Recalled:
    """An item CF proposed, with its CF score (and vector, when diversity needs one)."""

    item: Item
    cf_score: float
    vector: np.ndarray | None = None


@dataclass(frozen=True)
class CandidatePool:
    """What gathering found: candidates, history, retrieval's versions, degradations."""

    items: list[PoolItem]
    history: tuple[HistoryItem, ...]  # the request's known history items, most recent first
    query: str
    user_id: str
    versions: dict[str, str]
    reasons: list[DegradedReason]
    retrieved: int
    recalled: int
    max_text_chars: int
    # Every bundle version that answered a call of this gathering (retrieval's and CF's): one,
    # unless a service switched versions meanwhile.
    bundle_versions: frozenset[str] = frozenset()
    # The new product nearest the history (retrieval's new-items search), when one was asked for
    # and found, and the position `with_new_item` keeps for it (0: none, by its similarity).
    new_item: str | None = None
    new_item_slot: int = 0

    def context(self) -> RankContext:
        """What ranking is told about the request."""
        return RankContext(query=self.query, user_id=self.user_id, history=self.history)

    def candidates(self) -> list[Candidate]:
        """What ranking scores; texts the catalog holds beyond the limit are cut to it."""
        return [
            Candidate(
                p.item_id, _text(p.item, self.max_text_chars), p.retrieval_score, p.lexical_score
            )
            for p in self.items
        ]


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
    pool = [
        PoolItem(
            h.item_id,
            h.item,
            h.dense_score if h.dense_score is not None else h.score,
            vector=h.vector,
            lexical_score=h.lexical_score,
            hit_score=h.score,
        )
        for h in hits
    ]
    seen = {h.item_id for h in hits}
    pool += [
        PoolItem(r.item.item_id, r.item, None, cf_score=r.cf_score, vector=r.vector)
        for r in recalled
        if r.item.item_id not in seen
    ]
    return pool


def with_new_item(
    order: Sequence[T], item_id: Callable[[T], str], new_item: str | None, slot: int
) -> list[T]:
    """`order` (best first) with the pool's new product (`CandidatePool.new_item`) moved up to
    position `slot` (from 1) when it is lower; unchanged when slot is 0 or it is not in `order`."""
    out = list(order)
    ids = [item_id(x) for x in out]
    if not slot or new_item not in ids:
        return out
    at = ids.index(new_item)
    if at >= slot:
        out.insert(slot - 1, out.pop(at))
    return out


async def gather_candidates(
    request: RecommendRequest,
    retrieval: RetrievalStage,
    ranking: RankingStage,
    policy: PoolPolicy,
    end: float,
    version: str = "",
) -> CandidatePool:
    """Search, CF recall and the history items' texts, concurrently, before `end`
    (time.perf_counter() seconds); every call pinned to bundle `version` when one is given."""
    if end - time.perf_counter() <= 0:
        raise DeadlineExceeded("the deadline expired before retrieval could start")
    history_ids = request.history_item_ids
    dense_k, cf_k = pool_split(
        request.candidate_pool,
        has_query=bool(request.query),
        has_history=bool(history_ids),
        cf_share=policy.cf_share,
    )
    # A recommender should not return what the user already has.
    exclude = request.exclude_item_ids | frozenset(history_ids)
    search = lookup = recall = newest = None
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
        search = _start(retrieval.search(query, end - time.perf_counter(), version), end)
    if history_ids:
        lookup = _start(_get_items(retrieval, history_ids, end, policy, version=version), end)
    if cf_k:
        recall = _start(
            _recall(request, retrieval, ranking, cf_k, exclude, end, policy, version),
            end,
            "CF recall",
        )
    if dense_k and not request.query and policy.new_item_slot:
        newest = _start(
            retrieval.search(
                SearchQuery(
                    top_k=1,
                    # The most recent item alone: nearer the next purchase than the whole
                    # history's mean on the new-items protocol's validation users (docs).
                    history_item_ids=history_ids[:1],
                    categories=request.categories,
                    exclude_item_ids=exclude,
                    include_text=True,
                    include_vectors=request.diversity > 0,
                    new_items_only=True,
                ),
                end - time.perf_counter(),
                version,
            ),
            end,
        )
    tasks = [t for t in (search, lookup, recall, newest) if t is not None]
    try:
        result: SearchResult | None = await search if search is not None else None
        found, answered = await lookup if lookup is not None else ([], set())
        recalled, recall_versions, reasons = await _recalled(recall, required=search is None)
        new = await _new_items(newest)
    finally:
        for task in tasks:
            task.cancel()  # a failure leaves the others unawaited: stop them
            # Their own failures are part of the one raised here, not unhandled errors.
            task.add_done_callback(_retrieved)
    answered |= recall_versions
    if result is not None:
        answered.add(result.bundle_version)
    hits = result.hits if result is not None else []
    newest_hits = [h for h in new.hits if "new" in h.found_by] if new is not None else []
    if new is not None:
        answered.add(new.bundle_version)
        seen = {h.item_id for h in hits}
        hits = hits + [h for h in newest_hits if h.item_id not in seen]
    versions = {"bundle_version": result.bundle_version, **result.versions} if result else {}
    # Unknown history ids are simply not in the context.
    history = tuple(
        HistoryItem(item.item_id, _text(item, policy.max_text_chars)) for item, _ in found
    )
    return CandidatePool(
        items=merge(hits, recalled),
        history=history,
        query=request.query,
        user_id=request.user_id,
        versions=versions,
        reasons=reasons,
        retrieved=len(hits),
        recalled=len(recalled),
        max_text_chars=policy.max_text_chars,
        bundle_versions=frozenset(answered - {""}),
        new_item=newest_hits[0].item_id if newest_hits else None,
        new_item_slot=_slot(newest_hits[0], policy) if newest_hits else 0,
    )


def _slot(newest: Hit, policy: PoolPolicy) -> int:
    """The position kept for the new product: by how near it is to the most recent item (the
    new-items hit's score is their cosine), the nearer the higher; none when it is far."""
    if newest.score >= policy.new_item_lead_similarity:
        return 1
    return policy.new_item_slot if newest.score >= policy.new_item_min_similarity else 0


async def _get_items(
    retrieval: RetrievalStage,
    item_ids: Sequence[str],
    end: float,
    policy: PoolPolicy,
    include_vectors: bool = False,
    version: str = "",
) -> tuple[list[tuple[Item, np.ndarray | None]], set[str]]:
    """Known items in `item_ids` order, in calls of at most the ids retrieval accepts, and the
    bundle versions that answered."""
    step = policy.max_ids_per_call
    parts = await asyncio.gather(
        *(
            retrieval.get_items(
                item_ids[i : i + step], end - time.perf_counter(), include_vectors, version
            )
            for i in range(0, len(item_ids), step)
        )
    )
    return [found for part in parts for found in part.found], {p.bundle_version for p in parts}


async def _recall(
    request: RecommendRequest,
    retrieval: RetrievalStage,
    ranking: RankingStage,
    k: int,
    exclude: frozenset[str],
    end: float,
    policy: PoolPolicy,
    version: str = "",
) -> tuple[list[Recalled], set[str]]:
    """CF's candidates with their items from retrieval (deleted or filtered-out ones dropped),
    and the bundle versions that answered."""
    result = await ranking.recall(
        request.user_id, request.history_item_ids, k, exclude, end - time.perf_counter(), version
    )
    scores = dict(result.items)
    found, answered = await _get_items(
        retrieval, list(scores), end, policy, request.diversity > 0, version
    )
    recalled = [
        Recalled(item, scores[item.item_id], vector)
        for item, vector in found
        if not request.categories or item.category in request.categories
    ]
    return recalled, answered | {result.bundle_version}


async def _recalled(
    recall: asyncio.Future[tuple[list[Recalled], set[str]]] | None, required: bool
) -> tuple[list[Recalled], set[str], list[DegradedReason]]:
    """CF's candidates and the versions that answered, and [CF_UNAVAILABLE] when CF failed but
    retrieval answered."""
    if recall is None:
        return [], set(), []
    try:
        recalled, answered = await recall
    except Exception as exc:
        # CF was the only source, or was asked for a version: its answer is the request's.
        if required or isinstance(exc, VersionUnavailable):
            raise
        if isinstance(exc, NotFound):
            return [], set(), []  # CF knows nothing of this user: no candidates, no fault
        log.warning("CF recall failed, candidates from retrieval only: %r", exc)
        return [], set(), [DegradedReason.CF_UNAVAILABLE]
    return recalled, answered, []


async def _new_items(search: asyncio.Future[SearchResult] | None) -> SearchResult | None:
    """The new-items search's answer; None when none was asked for or it failed (the answer
    then simply has no new product)."""
    if search is None:
        return None
    try:
        return await search
    except VersionUnavailable:
        raise
    except InvalidInput:
        return None  # the most recent item is not in the catalog (any more)
    except Exception as exc:
        log.warning("new-items search failed, answering without a new product: %r", exc)
        return None


def _retrieved(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _start(call: Awaitable[T], end: float, stage: str = "retrieval") -> asyncio.Future[T]:
    """Runs `call` as a task that gives up (DeadlineExceeded) at `end`."""
    inner = asyncio.ensure_future(call)
    # Cancelled after failing on its own (beside another call's failure): not unhandled.
    inner.add_done_callback(_retrieved)
    return asyncio.ensure_future(within(inner, end - time.perf_counter(), stage))


def _text(item: Item | None, limit: int) -> str:
    return item.text()[:limit] if item is not None else ""
