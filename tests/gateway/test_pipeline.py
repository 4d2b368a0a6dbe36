"""RecommendPipeline end to end in-process, over the real Local*/Grpc* stages.

The retriever and ranker behind the Local stages are tiny but real stand-ins for the other
services (a bag-of-words cosine search over eight items; a word-overlap ranker), so every
answer here can be checked by hand. The real services are covered by tests/integration.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from gateway.diversity import intra_list_diversity
from gateway.pipeline import Recommendation, RecommendPipeline, RecommendRequest
from gateway.servicer import GatewayService, GatewayServicer, to_proto
from gateway.stages import (
    GrpcRankingStage,
    GrpcRetrievalStage,
    LocalRankingStage,
    LocalRetrievalStage,
    StageError,
)
from ranking_service.ranker import Recall
from recsys.domain import Candidate, Hit, Item, RankContext, Scored, Scores, SearchQuery
from recsys.errors import DeadlineExceeded, InvalidInput, NotFound, NotReady, Overloaded
from recsys.settings import Settings
from recsys.v1 import gateway_pb2

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
SETTINGS = Settings()


def embed(text: str) -> np.ndarray:
    """Bag of words over VOCAB, L2-normalised (all zeros when no word is known)."""
    words = re.findall(r"[a-z]+", text.lower())
    vector = np.array([words.count(w) for w in VOCAB], dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm else vector


class TinyRetriever:
    """Exact cosine search with Retriever's interface: search, get_items, version, info."""

    version = "v-test"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.items = {item.item_id: item for item in CATALOG}
        self.vectors = {item.item_id: embed(item.text()) for item in CATALOG}
        self.delay_s = delay_s
        self.queries: list[SearchQuery] = []

    def info(self) -> dict[str, Any]:
        return {"bundle_version": self.version, "encoder": "bag-of-words", "index_factory": "Flat"}

    def search(self, query: SearchQuery) -> tuple[list[Hit], list[str]]:
        time.sleep(self.delay_s)
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
            )
            for item_id, v in self.vectors.items()
            if item_id not in query.exclude_item_ids
            and (not query.categories or self.items[item_id].category in query.categories)
        ]
        hits.sort(key=lambda h: -h.score)
        unknown = [i for i in query.history_item_ids if i not in self.items]
        return hits[: query.top_k], unknown

    def get_items(self, item_ids: Sequence[str]) -> tuple[list[tuple[Item, np.ndarray]], list[str]]:
        found = [(self.items[i], self.vectors[i]) for i in item_ids if i in self.items]
        return found, [i for i in item_ids if i not in self.items]


@dataclass(frozen=True)
class Outcome:
    scored: list[Scored]
    cf_folded_in: bool


# The stand-in CF's fixed preference, and the users it was "trained" on.
CF_ORDER = ("b1", "c1", "t2", "r2", "t1", "r3", "r1", "r4")
CF_USERS = frozenset({"u1"})


class OverlapRanker:
    """Ranker's interface: fused = 0.7 · word overlap with the context + 0.3 · retrieval score.

    Its `recall` proposes CF_ORDER to known users and to anyone with a history.
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

    def recall(
        self, user_id: str, history: Sequence[str], k: int, exclude: frozenset[str]
    ) -> Recall:
        self.recalls.append((user_id, tuple(history), k))
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
        return Outcome(scored, cf_folded_in=False)


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


class SlowRanker(OverlapRanker):
    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    async def rank(self, context: RankContext, candidates: Sequence[Candidate]) -> Outcome:
        await asyncio.sleep(self.delay_s)
        return await super().rank(context, candidates)


def pipeline(
    ranker: Any = None, retriever: TinyRetriever | None = None, settings: Settings = SETTINGS
) -> RecommendPipeline:
    return RecommendPipeline(
        LocalRetrievalStage(retriever or TinyRetriever()),
        LocalRankingStage(ranker or OverlapRanker()),
        settings,
    )


def recommend(
    p: RecommendPipeline, deadline_s: float | None = 5.0, **fields: Any
) -> Recommendation:
    fields = {"k": 3, "candidate_pool": 8, **fields}
    return asyncio.run(p.recommend(RecommendRequest(**fields), deadline_s))


def retrieval_order(**fields: Any) -> list[str]:
    hits, _ = TinyRetriever().search(SearchQuery(**fields))
    return [h.item_id for h in hits]


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
        (StageError("ranking", grpc.StatusCode.INTERNAL, "boom"), "ranking_error"),
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
    started = time.perf_counter()
    answer = recommend(pipeline(SlowRanker(delay_s=5.0)), deadline_s=0.3, query="coffee")
    elapsed = time.perf_counter() - started
    assert answer.degraded_reasons == ["ranking_timeout"]
    assert answer.items[0].item_id == "c1"
    assert elapsed < 0.3


def test_default_budget_applies_when_the_caller_set_no_deadline() -> None:
    settings = Settings(default_budget_ms=200, ranking_budget_fraction=0.5)
    started = time.perf_counter()
    answer = recommend(pipeline(SlowRanker(5.0), settings=settings), deadline_s=None, query="tent")
    assert answer.degraded_reasons == ["ranking_timeout"]
    # Ranking got half of what retrieval left: about 0.1 s of the 0.2 s budget.
    assert 0.09 < time.perf_counter() - started < 0.2


def test_ranking_over_grpc_down_is_unavailable() -> None:
    settings = Settings(ranking_address=dead_address())

    async def run() -> Recommendation:
        ranking = GrpcRankingStage(settings)
        try:
            p = RecommendPipeline(LocalRetrievalStage(TinyRetriever()), ranking, settings)
            return await p.recommend(RecommendRequest(k=2, candidate_pool=4, query="tent"), 5.0)
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
            await p.recommend(RecommendRequest(k=2, candidate_pool=4, query="tent"), 5.0)
        finally:
            await retrieval.close()

    started = time.perf_counter()
    with pytest.raises(NotReady, match=f"retrieval service unavailable at {address}"):
        asyncio.run(run())
    assert time.perf_counter() - started < 2.0


def test_retrieval_invalid_input_propagates_with_its_message() -> None:
    with pytest.raises(InvalidInput, match="give query_text"):
        recommend(pipeline(), query="zzz")


def test_deadline_expiring_in_retrieval_is_deadline_exceeded() -> None:
    slow = TinyRetriever(delay_s=0.5)
    with pytest.raises(DeadlineExceeded):
        recommend(pipeline(retriever=slow), deadline_s=0.1, query="tent")
    with pytest.raises(DeadlineExceeded):
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


def test_load_keeps_waiting_while_retrieval_is_down() -> None:
    service = GatewayService(Settings(retrieval_address=dead_address(), default_budget_ms=100))

    async def run() -> bool:
        load = asyncio.create_task(service.load())
        await asyncio.sleep(0.5)
        waiting = not load.done()
        load.cancel()
        await service.close()
        return waiting

    assert asyncio.run(run())
    assert service.servicer.pipeline is None
