"""One bundle version per answer while retrieval and ranking switch versions at different times.

Each side is the real Local* stages over the tiny stand-ins, one per version, behind a stage
that behaves like a service during a hot swap: unpinned calls go to the live version, a pinned
call to the version it names while that one is held, else VersionUnavailable.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.pipeline import RecommendPipeline
from gateway.protocol import Recommendation, RecommendRequest
from gateway.stages import ItemsResult, RankResult, RecallResult, SearchResult
from recsys.core.domain import Candidate, RankContext, SearchQuery
from recsys.core.errors import NotReady, VersionUnavailable
from recsys.core.settings import Settings
from recsys.offline.local import LocalRankingStage, LocalRetrievalStage
from tests.gateway.conftest import OverlapRanker, TinyRetriever

DEADLINE_S = 30.0


class Held:
    """The versions one service holds (live first) and every version each call was pinned to."""

    def __init__(self, service: str, stages: dict[str, Any]) -> None:
        self.service = service
        self.stages = stages
        self.pins: list[str] = []

    def pick(self, version: str) -> Any:
        self.pins.append(version)
        if not version:
            return next(iter(self.stages.values()))
        if version not in self.stages:
            raise VersionUnavailable(self.service, version, tuple(self.stages))
        return self.stages[version]


class HeldRetrieval(Held):
    def __init__(self, *versions: str) -> None:
        stages = {}
        for version in versions:
            retriever = TinyRetriever()
            retriever.version = version
            stages[version] = LocalRetrievalStage(retriever)  # type: ignore[arg-type]
        super().__init__("retrieval", stages)

    async def search(self, query: SearchQuery, timeout: float, version: str = "") -> SearchResult:
        result: SearchResult = await self.pick(version).search(query, timeout)
        return result

    async def get_items(
        self,
        item_ids: Sequence[str],
        timeout: float,
        include_vectors: bool = False,
        version: str = "",
    ) -> ItemsResult:
        result: ItemsResult = await self.pick(version).get_items(item_ids, timeout, include_vectors)
        return result

    async def close(self) -> None:
        return None


class HeldRanking(Held):
    def __init__(self, *versions: str) -> None:
        stages = {}
        for version in versions:
            ranker = OverlapRanker()
            ranker.versions["bundle_version"] = version
            stages[version] = LocalRankingStage(ranker)  # type: ignore[arg-type]
        super().__init__("ranking", stages)

    async def rank(
        self,
        context: RankContext,
        candidates: Sequence[Candidate],
        timeout: float,
        version: str = "",
    ) -> RankResult:
        result: RankResult = await self.pick(version).rank(context, candidates, timeout)
        return result

    async def recall(
        self,
        user_id: str,
        history: Sequence[str],
        k: int,
        exclude: frozenset[str],
        timeout: float,
        version: str = "",
    ) -> RecallResult:
        result: RecallResult = await self.pick(version).recall(
            user_id, history, k, exclude, timeout
        )
        return result

    async def close(self) -> None:
        return None


REQUESTS = {
    "query": {"query": "trail running"},
    "history with CF": {"user_id": "u1", "history_item_ids": ("t1",)},
    "user only": {"user_id": "u1"},
}


def recommend(retrieval: HeldRetrieval, ranking: HeldRanking, **fields: Any) -> Recommendation:
    pipeline = RecommendPipeline(retrieval, ranking, Settings())
    request = RecommendRequest(**{"k": 3, "candidate_pool": 8, **fields})
    return asyncio.run(pipeline.recommend(request, DEADLINE_S))


@pytest.mark.parametrize("fields", REQUESTS.values(), ids=REQUESTS.keys())
@pytest.mark.parametrize(
    ("retrieval", "ranking"),
    [(("v2", "v1"), ("v1",)), (("v1",), ("v2", "v1")), (("v2", "v1"), ("v2", "v1"))],
    ids=["retrieval switched first", "ranking switched first", "both switched"],
)
def test_an_answer_comes_from_one_version_that_both_sides_hold(
    fields: dict[str, Any], retrieval: tuple[str, ...], ranking: tuple[str, ...]
) -> None:
    answer = recommend(HeldRetrieval(*retrieval), HeldRanking(*ranking), **fields)
    assert not answer.degraded and answer.items
    expected = retrieval[0] if retrieval[0] in ranking else ranking[0]
    assert answer.versions["bundle_version"] == expected
    assert answer.versions["ranking_bundle_version"] == expected


def test_without_a_common_version_a_query_is_answered_unranked_by_retrieval_alone() -> None:
    answer = recommend(HeldRetrieval("v2"), HeldRanking("v1"), query="trail running")
    assert answer.degraded and answer.degraded_reasons == ["ranking_unavailable"]
    assert answer.versions["bundle_version"] == "v2"
    assert "ranking_bundle_version" not in answer.versions


def test_without_a_common_version_cf_candidates_are_never_mixed_in() -> None:
    with pytest.raises(NotReady, match="hold none in common"):
        recommend(HeldRetrieval("v2"), HeldRanking("v1"), user_id="u1", history_item_ids=("t1",))


def test_a_steady_version_is_answered_in_one_gathering_pinning_ranking_only() -> None:
    retrieval, ranking = HeldRetrieval("v1"), HeldRanking("v1")
    answer = recommend(retrieval, ranking, user_id="u1", history_item_ids=("t1",))
    assert not answer.degraded and answer.versions["ranking_bundle_version"] == "v1"
    assert set(retrieval.pins) == {""}  # Search and GetItems: the live version
    assert ranking.pins == ["", "v1"]  # CF recall unpinned, Rank pinned to retrieval's version
