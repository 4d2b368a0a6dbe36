"""RecommendPipeline end to end in-process, over the real Local*/Grpc* stages.

The retriever and ranker behind the Local stages are tiny but real stand-ins for the other
services (tests/gateway/conftest.py: a bag-of-words cosine search over eight items; a
word-overlap ranker), so every answer here can be checked by hand. The real services are
covered by tests/integration.

No assertion here depends on how fast this machine is: a stage that must be cut off waits on
an asyncio.Event nobody sets, deadlines leave seconds of margin, and what is checked is the
outcome (the degraded reason, the stage that was cancelled, the budget it was given).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from gateway.diversity import intra_list_diversity
from gateway.pipeline import RecommendPipeline
from gateway.protocol import Recommendation, RecommendRequest
from gateway.servicer import GatewayService, GatewayServicer, to_proto
from gateway.stages import (
    GrpcRankingStage,
    GrpcRetrievalStage,
    RankResult,
    RecallResult,
    SearchResult,
)
from ranking_service.ranker import Recall
from recsys.core.domain import Candidate, RankContext, Scores, SearchQuery
from recsys.core.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    UpstreamError,
)
from recsys.core.settings import Settings
from recsys.offline.local import LocalRankingStage, LocalRetrievalStage
from recsys.v1 import gateway_pb2
from tests.gateway.conftest import (
    CATALOG,
    CF_ORDER,
    Outcome,
    OverlapRanker,
    TinyRetriever,
    retrieval_order,
)

SETTINGS = Settings()
# The deadline of calls that must not run out of time: generous, since none waits for it.
DEADLINE_S = 30.0
# How long a stalled stage waits before giving up, so a broken pipeline fails instead of hanging.
STALL_LIMIT_S = 20.0


class FailingRanker:
    def __init__(self, error: Exception) -> None:
        self.versions: dict[str, str] = {}
        self.error = error

    def recall(self, *args: Any) -> Recall:
        raise self.error

    async def rank(self, context: RankContext, candidates: Sequence[Candidate]) -> Outcome:
        raise self.error


class RecallFailingRanker(OverlapRanker):
    def recall(self, *args: Any) -> Recall:
        raise NotReady("CF is loading")


class StalledRankingStage:
    """A ranking stage whose Rank never answers and ignores its timeout (a hung peer).

    It records the timeout it was given and whether the pipeline cancelled it; recall is
    answered by the overlap ranker.
    """

    def __init__(self) -> None:
        self.recaller = LocalRankingStage(OverlapRanker())
        self.timeouts: list[float] = []
        self.cancelled = 0

    async def rank(
        self,
        context: RankContext,
        candidates: Sequence[Candidate],
        timeout: float,
        version: str = "",
    ) -> RankResult:
        self.timeouts.append(timeout)
        try:
            await asyncio.wait_for(asyncio.Event().wait(), STALL_LIMIT_S)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("the pipeline waited for a ranking stage past its budget")

    async def recall(
        self,
        user_id: str,
        history: Sequence[str],
        k: int,
        exclude: frozenset[str],
        timeout: float,
        version: str = "",
    ) -> RecallResult:
        return await self.recaller.recall(user_id, history, k, exclude, timeout, version)

    async def close(self) -> None:
        return None


class StalledRetrievalStage(LocalRetrievalStage):
    """TinyRetriever behind a Search that never answers (a hung retrieval)."""

    def __init__(self) -> None:
        super().__init__(TinyRetriever())
        self.cancelled = 0

    async def search(self, query: SearchQuery, timeout: float, version: str = "") -> SearchResult:
        try:
            await asyncio.wait_for(asyncio.Event().wait(), STALL_LIMIT_S)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("the pipeline waited for retrieval past the deadline")


def pipeline(
    ranker: Any = None, retriever: TinyRetriever | None = None, settings: Settings = SETTINGS
) -> RecommendPipeline:
    return RecommendPipeline(
        LocalRetrievalStage(retriever or TinyRetriever()),
        LocalRankingStage(ranker or OverlapRanker()),
        settings,
    )


def recommend(
    p: RecommendPipeline, deadline_s: float | None = DEADLINE_S, **fields: Any
) -> Recommendation:
    fields = {"k": 3, "candidate_pool": 8, **fields}
    return asyncio.run(p.recommend(RecommendRequest(**fields), deadline_s))


def degraded_count(reason: str) -> float:
    return REGISTRY.get_sample_value("recsys_degraded_responses_total", {"reason": reason}) or 0.0


def dead_address() -> str:
    """A local port nothing listens on, so connecting fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


# -- ranking answers ---------------------------------------------------------------------------


def test_ranked_answer_is_in_fused_order_with_breakdown_and_versions() -> None:
    ranker = OverlapRanker()
    answer = recommend(pipeline(ranker), query="trail", history_item_ids=("t1",), user_id="u1")
    assert not answer.degraded and answer.degraded_reasons == []
    fused = [i.score for i in answer.items]
    assert fused == sorted(fused, reverse=True) and len(fused) == 3
    for item in answer.items:
        assert item.score == item.scores.fused
        assert item.scores.cross_encoder is not None and item.scores.retrieval is not None
        assert item.scores.fused == pytest.approx(
            0.7 * item.scores.cross_encoder + 0.3 * item.scores.retrieval
        )
        assert item.title == next(i.title for i in CATALOG if i.item_id == item.item_id)
    # The ranking context carries the history item's text, fetched from retrieval.
    (context,) = ranker.contexts
    assert context.user_id == "u1" and context.query == "trail"
    assert [(h.item_id, h.text) for h in context.history] == [("t1", "Camping tent. outdoor")]
    assert answer.versions == {
        "bundle_version": "v-test",
        "encoder": "bag-of-words",
        "index_factory": "Flat",
        "cross_encoder": "overlap",
        "fusion": "mix",
        "ranking_bundle_version": "v-test",
    }
    assert {"retrieval", "ranking", "total"} <= set(answer.timings)
    assert "diversity" not in answer.timings


def test_ranking_can_reorder_retrieval() -> None:
    # Retrieval ranks by cosine; the overlap ranker prefers exact word matches of the context.
    order = retrieval_order(text="running trail", top_k=8, include_text=True)
    answer = recommend(pipeline(), query="running trail", k=8)
    assert [i.item_id for i in answer.items] != order
    assert sorted(i.item_id for i in answer.items) == sorted(order)


def test_history_and_excluded_items_are_never_returned() -> None:
    retriever = TinyRetriever()
    ranker = OverlapRanker()
    answer = recommend(
        pipeline(ranker, retriever),
        k=8,
        history_item_ids=("r1", "nope-404"),
        exclude_item_ids=frozenset({"r2"}),
    )
    returned = {i.item_id for i in answer.items}
    assert returned and not returned & {"r1", "r2"}
    assert len(returned) == len(CATALOG) - 2
    # Unknown history ids are skipped in the ranking context, not an error.
    assert [h.item_id for h in ranker.contexts[0].history] == ["r1"]
    assert retriever.queries[0].exclude_item_ids == {"r1", "nope-404", "r2"}


def test_category_filter_and_empty_result() -> None:
    answer = recommend(pipeline(), query="running", categories=frozenset({"books"}))
    assert [i.item_id for i in answer.items] == ["b1"]
    empty = recommend(pipeline(), query="running", categories=frozenset({"garden"}))
    assert empty.items == [] and not empty.degraded


# -- CF candidates -----------------------------------------------------------------------------


def test_without_a_query_cf_fills_its_share_of_the_pool() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    answer = recommend(pipeline(ranker, retriever), k=8, candidate_pool=6, history_item_ids=("r1",))
    assert retriever.queries[0].top_k == 3  # cf_candidate_share 0.5 of 6
    assert ranker.recalls == [("", ("r1",), 3)]
    dense = retrieval_order(history_item_ids=("r1",), top_k=3, exclude_item_ids=frozenset({"r1"}))
    recalled = [i for i in CF_ORDER if i != "r1"][:3]
    sent = ranker.candidates[0]
    # Retrieval's hits first, with their scores; then CF's own, which retrieval never scored.
    assert [c.item_id for c in sent] == dense + [i for i in recalled if i not in dense]
    assert len(sent) > 3
    assert [c.retrieval_score is None for c in sent] == [False] * 3 + [True] * (len(sent) - 3)
    assert all(c.text for c in sent)  # CF's items got their texts from retrieval
    returned = {i.item_id: i for i in answer.items}
    assert set(returned) == {c.item_id for c in sent}
    assert all(returned[c.item_id].scores.retrieval is None for c in sent[3:])


def test_with_a_query_only_retrieval_proposes() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    recommend(pipeline(ranker, retriever), query="tent", user_id="u1", history_item_ids=("t1",))
    assert ranker.recalls == [] and retriever.queries[0].top_k == 8


def test_user_id_alone_is_answered_from_cf() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    answer = recommend(pipeline(ranker, retriever), k=3, candidate_pool=4, user_id="u1")
    assert retriever.queries == [] and ranker.recalls == [("u1", (), 4)]
    assert [c.item_id for c in ranker.candidates[0]] == list(CF_ORDER[:4])
    assert len(answer.items) == 3 and not answer.degraded
    with pytest.raises(NotFound, match="unknown to CF"):
        recommend(pipeline(), user_id="stranger")


def test_cf_candidates_respect_filters_and_deletions() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    del retriever.items["b1"]  # CF still proposes it; retrieval no longer has it
    answer = recommend(
        pipeline(ranker, retriever),
        k=8,
        user_id="u1",
        categories=frozenset({"outdoor", "kitchen"}),
        exclude_item_ids=frozenset({"c1"}),
    )
    assert [i.item_id for i in answer.items] and {i.category for i in answer.items} == {"outdoor"}
    assert "b1" not in {i.item_id for i in answer.items}


def test_cf_recall_failure_keeps_retrieval_candidates_and_says_so() -> None:
    before = degraded_count("cf_unavailable")
    ranker = RecallFailingRanker()
    answer = recommend(pipeline(ranker), k=3, candidate_pool=6, history_item_ids=("t1",))
    assert answer.degraded_reasons == ["cf_unavailable"] and len(answer.items) == 3
    assert all(c.retrieval_score is not None for c in ranker.candidates[0])
    assert degraded_count("cf_unavailable") == before + 1


def test_ranking_down_for_a_user_id_alone_is_unavailable() -> None:
    with pytest.raises(NotReady):
        recommend(pipeline(FailingRanker(NotReady("down"))), user_id="u1")


# -- degraded answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (NotReady("ranking is loading its models"), "ranking_unavailable"),
        (Overloaded("queue full"), "ranking_overloaded"),
        (DeadlineExceeded("too slow"), "ranking_timeout"),
        (UpstreamError("ranking", "INTERNAL", "boom"), "ranking_error"),
        (RuntimeError("a bug in the ranker"), "ranking_error"),
    ],
)
def test_ranking_failure_answers_in_retrieval_order(error: Exception, reason: str) -> None:
    before = degraded_count(reason)
    answer = recommend(pipeline(FailingRanker(error)), query="running shoes", k=4)
    assert answer.degraded and answer.degraded_reasons == [reason]
    assert [i.item_id for i in answer.items] == retrieval_order(text="running shoes", top_k=4)
    for item in answer.items:
        assert item.scores == Scores(fused=item.score, retrieval=item.score)
    assert answer.versions == {
        "bundle_version": "v-test",
        "encoder": "bag-of-words",
        "index_factory": "Flat",
    }
    assert degraded_count(reason) == before + 1


def test_slow_ranking_degrades_before_the_callers_deadline() -> None:
    # Ranking may use a quarter of what is left (about 1 s of 4 s), so the degraded answer is
    # due ~3 s before the caller's deadline: a margin a busy machine keeps.
    settings = Settings(ranking_budget_fraction=0.25)
    ranking = StalledRankingStage()
    p = RecommendPipeline(LocalRetrievalStage(TinyRetriever()), ranking, settings)
    started = time.perf_counter()
    answer = recommend(p, deadline_s=4.0, query="coffee")
    elapsed = time.perf_counter() - started
    assert answer.degraded and answer.degraded_reasons == ["ranking_timeout"]
    assert answer.items[0].item_id == "c1"  # retrieval's order
    # The pipeline cut the hung stage itself (it ignores its timeout) at the budget it gave it.
    assert ranking.cancelled == 1
    (budget,) = ranking.timeouts
    assert 0 < budget <= 0.25 * 4.0
    assert elapsed < 4.0


def test_default_budget_applies_when_the_caller_set_no_deadline() -> None:
    settings = Settings(default_budget_ms=4000, ranking_budget_fraction=0.25)
    ranking = StalledRankingStage()
    p = RecommendPipeline(LocalRetrievalStage(TinyRetriever()), ranking, settings)
    started = time.perf_counter()
    answer = recommend(p, deadline_s=None, query="tent")
    elapsed = time.perf_counter() - started
    assert answer.degraded_reasons == ["ranking_timeout"] and ranking.cancelled == 1
    # Ranking got a quarter of what gathering left of the 4 s default budget (the slack allows
    # for the machine pausing between the two clock readings).
    (budget,) = ranking.timeouts
    left = 4.0 - answer.timings["retrieval"]
    assert 0.25 * left - 0.25 < budget <= 0.25 * left
    assert elapsed < 4.0


def test_ranking_over_grpc_down_is_unavailable() -> None:
    settings = Settings(ranking_address=dead_address())

    async def run() -> Recommendation:
        ranking = GrpcRankingStage(settings)
        try:
            p = RecommendPipeline(LocalRetrievalStage(TinyRetriever()), ranking, settings)
            return await p.recommend(
                RecommendRequest(k=2, candidate_pool=4, query="tent"), DEADLINE_S
            )
        finally:
            await ranking.close()

    answer = asyncio.run(run())
    assert answer.degraded_reasons == ["ranking_unavailable"]
    assert [i.item_id for i in answer.items] == retrieval_order(text="tent", top_k=2)


# -- retrieval failures ------------------------------------------------------------------------


def test_retrieval_down_fails_fast_with_not_ready() -> None:
    address = dead_address()
    settings = Settings(retrieval_address=address)

    async def run() -> None:
        retrieval = GrpcRetrievalStage(settings)
        try:
            p = RecommendPipeline(retrieval, LocalRankingStage(OverlapRanker()), settings)
            await p.recommend(RecommendRequest(k=2, candidate_pool=4, query="tent"), DEADLINE_S)
        finally:
            await retrieval.close()

    started = time.perf_counter()
    with pytest.raises(NotReady, match=f"retrieval service unavailable at {address}"):
        asyncio.run(run())
    # Fast: a refused connection is an answer, not a reason to wait out the 30 s deadline.
    assert time.perf_counter() - started < DEADLINE_S / 3


def test_retrieval_invalid_input_propagates_with_its_message() -> None:
    with pytest.raises(InvalidInput, match="give query_text"):
        recommend(pipeline(), query="zzz")


def test_deadline_expiring_in_retrieval_is_deadline_exceeded() -> None:
    retrieval = StalledRetrievalStage()
    ranker = OverlapRanker()
    p = RecommendPipeline(retrieval, LocalRankingStage(ranker), SETTINGS)
    with pytest.raises(DeadlineExceeded, match="retrieval did not answer"):
        recommend(p, deadline_s=0.5, query="tent")
    assert retrieval.cancelled == 1 and ranker.contexts == []
    with pytest.raises(DeadlineExceeded, match="before retrieval could start"):
        recommend(pipeline(), deadline_s=0.0, query="tent")


# -- diversity ---------------------------------------------------------------------------------


def test_diversity_spreads_near_duplicates_and_asks_for_vectors() -> None:
    retriever = TinyRetriever()
    plain = recommend(pipeline(retriever=retriever), query="running shoes", k=3)
    diverse = recommend(pipeline(retriever=retriever), query="running shoes", k=3, diversity=0.8)
    assert [q.include_vectors for q in retriever.queries] == [False, True]
    assert plain.items[0].item_id == diverse.items[0].item_id  # the best item stays first
    assert [i.item_id for i in plain.items] != [i.item_id for i in diverse.items]
    assert all(i.vector is None for i in plain.items)
    assert "diversity" in diverse.timings

    def spread(answer: Recommendation) -> float:
        return intra_list_diversity(np.stack([retriever.vectors[i.item_id] for i in answer.items]))

    assert spread(diverse) > spread(plain)


# -- the gRPC edge -----------------------------------------------------------------------------


def test_to_proto_keeps_breakdown_timings_and_versions() -> None:
    answer = recommend(pipeline(FailingRanker(NotReady("down"))), query="coffee", k=2)
    reply = to_proto(answer)
    assert [i.item_id for i in reply.items] == [i.item_id for i in answer.items]
    first = reply.items[0]
    assert first.title == "Espresso coffee grinder" and first.category == "kitchen"
    assert first.scores.HasField("retrieval") and not first.scores.HasField("cross_encoder")
    assert reply.degraded and list(reply.degraded_reasons) == ["ranking_unavailable"]
    assert {t.stage for t in reply.timings} == {
        gateway_pb2.STAGE_RETRIEVAL,
        gateway_pb2.STAGE_RANKING,
        gateway_pb2.STAGE_TOTAL,
    }
    assert reply.versions.bundle_version == "v-test" and reply.versions.encoder == "bag-of-words"
    assert reply.versions.cross_encoder == ""


def test_requests_before_load_are_not_ready() -> None:
    servicer = GatewayServicer(SETTINGS)
    with pytest.raises(NotReady, match="gateway is starting"):
        asyncio.run(servicer.Recommend(gateway_pb2.RecommendRequest(query="x"), None))  # type: ignore[arg-type]


def failed_index_info_calls() -> float:
    """GetIndexInfo calls this process made that found retrieval UNAVAILABLE."""
    labels = {
        "grpc_type": "unary",
        "grpc_service": "recsys.v1.RetrievalService",
        "grpc_method": "GetIndexInfo",
        "grpc_code": "UNAVAILABLE",
    }
    return REGISTRY.get_sample_value("grpc_client_handled_total", labels) or 0.0


def test_load_keeps_waiting_while_retrieval_is_down() -> None:
    service = GatewayService(Settings(retrieval_address=dead_address(), default_budget_ms=100))
    before = failed_index_info_calls()

    async def run() -> bool:
        load = asyncio.create_task(service.load())
        # Until retrieval was found down and asked again: the load retried instead of failing.
        give_up = time.monotonic() + 30
        while failed_index_info_calls() < before + 2 and time.monotonic() < give_up:
            assert not load.done(), load
            await asyncio.sleep(0.05)
        waiting = not load.done()
        load.cancel()
        await service.close()
        return waiting

    assert asyncio.run(run())
    assert failed_index_info_calls() >= before + 2
    assert service.servicer.pipeline is None
