"""The gateway's stages in this process (no gRPC), over a Retriever and a Ranker.

Offline code gathers candidate pools through these and `gateway.candidates`, exactly as the
gateway does over gRPC; the serving benchmark compares them with the real services.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tqdm.auto import tqdm

from gateway.candidates import CandidatePool, PoolPolicy, gather_candidates
from gateway.protocol import RecommendRequest
from gateway.stages import (
    RETRIEVAL_VERSION_FIELDS,
    ItemsResult,
    RankResult,
    RecallResult,
    SearchResult,
    within,
)
from ranking_service.ranker import Ranker
from recsys.core.domain import Candidate, RankContext, SearchQuery
from recsys.core.errors import VersionUnavailable
from retrieval_service.retriever import Retriever

# Offline gathering has no caller waiting: a deadline only a hung stage would reach.
OFFLINE_BUDGET_S = 600.0


class LocalRetrievalStage:
    """A Retriever in this process; its work runs in threads, as the service's does."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        # A Retriever serves one bundle version for its whole life.
        info = retriever.info()
        self._versions = {name: str(info[name]) for name in RETRIEVAL_VERSION_FIELDS}

    async def search(self, query: SearchQuery, timeout: float, version: str = "") -> SearchResult:
        _check(version, self.retriever.version, "retrieval")
        hits, _ = await within(
            asyncio.to_thread(self.retriever.search, query), timeout, "retrieval"
        )
        return SearchResult(hits, self.retriever.version, dict(self._versions))

    async def get_items(
        self,
        item_ids: Sequence[str],
        timeout: float,
        include_vectors: bool = False,
        version: str = "",
    ) -> ItemsResult:
        _check(version, self.retriever.version, "retrieval")
        found, missing = await within(
            asyncio.to_thread(self.retriever.get_items, item_ids), timeout, "retrieval"
        )
        return ItemsResult(
            [(item, vector if include_vectors else None) for item, vector in found],
            missing,
            self.retriever.version,
        )

    async def close(self) -> None:
        return None


class LocalRankingStage:
    """A Ranker in this process; it batches on the running event loop."""

    def __init__(self, ranker: Ranker) -> None:
        self.ranker = ranker

    async def rank(
        self,
        context: RankContext,
        candidates: Sequence[Candidate],
        timeout: float,
        version: str = "",
    ) -> RankResult:
        _check(version, self.ranker.versions.get("bundle_version", ""), "ranking")
        outcome = await within(self.ranker.rank(context, candidates), timeout, "ranking")
        versions = {name: value for name, value in outcome.versions.items() if value}
        return RankResult(list(outcome.scored), versions, bool(outcome.cf_folded_in))

    async def recall(
        self,
        user_id: str,
        history: Sequence[str],
        k: int,
        exclude: frozenset[str],
        timeout: float,
        version: str = "",
    ) -> RecallResult:
        held = self.ranker.versions.get("bundle_version", "")
        _check(version, held, "ranking")
        recall = await within(
            asyncio.to_thread(self.ranker.recall, user_id, history, k, exclude), timeout, "ranking"
        )
        return RecallResult(list(recall.items), bool(recall.cf_folded_in), held)

    async def close(self) -> None:
        return None


def _check(wanted: str, held: str, service: str) -> None:
    """A stage here holds one version: a call pinned to another is refused, as over gRPC
    (one that does not know its version refuses nothing)."""
    if wanted and held and wanted != held:
        raise VersionUnavailable(service, wanted, (held,))


def gather_pools(
    requests: Iterable[RecommendRequest],
    retriever: Retriever,
    ranker: Ranker,
    policy: PoolPolicy,
    desc: str | None = None,
) -> list[CandidatePool]:
    """The pool serving would rank for each request, gathered in this process, in order."""
    requests = list(requests)
    retrieval, ranking = LocalRetrievalStage(retriever), LocalRankingStage(ranker)

    async def gather_all() -> list[CandidatePool]:
        pools = []
        for request in tqdm(requests, desc=desc, unit="request", disable=desc is None):
            end = time.perf_counter() + OFFLINE_BUDGET_S
            pools.append(await gather_candidates(request, retrieval, ranking, policy, end))
        return pools

    return asyncio.run(gather_all())


def pool_request(
    pool: int,
    query: str = "",
    history: Sequence[str] = (),
    exclude: Iterable[str] = (),
) -> RecommendRequest:
    """The Recommend a caller would send to have `pool` candidates gathered for it."""
    return RecommendRequest(
        k=pool,
        candidate_pool=pool,
        query=query,
        history_item_ids=tuple(history),
        exclude_item_ids=frozenset(exclude),
    )


@dataclass(frozen=True)
class Pools:
    """The candidate pools serving would gather (gateway.candidates), over one version's
    retriever and ranker in this process: the build mines negatives and fits fusion on them."""

    retriever: Retriever
    ranker: Ranker
    size: int
    policy: PoolPolicy

    def request(
        self, query: str = "", history: Sequence[str] = (), exclude: Iterable[str] = ()
    ) -> RecommendRequest:
        return pool_request(self.size, query, history, exclude)

    def gather(
        self, requests: Iterable[RecommendRequest], desc: str | None = None
    ) -> list[CandidatePool]:
        return gather_pools(requests, self.retriever, self.ranker, self.policy, desc)
