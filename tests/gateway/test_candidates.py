"""gateway.candidates.gather_candidates: what the pool holds, in which order, and its limits.

Over the real Local stages and the stand-ins of tests/gateway/conftest.py; the end-to-end text
check runs the real ranking_service Ranker (its request validation included) behind them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
import pytest

from gateway.candidates import CandidatePool, PoolPolicy, gather_candidates, with_new_item
from gateway.pipeline import RecommendPipeline
from gateway.protocol import RecommendRequest
from ranking_service.cf import CFModel
from ranking_service.fusion import ConvexFusion
from ranking_service.ranker import Ranker
from recsys.core.domain import Candidate, Item, RankContext, SearchQuery
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from recsys.offline.local import LocalRankingStage, LocalRetrievalStage
from tests.gateway.conftest import (
    CATALOG,
    CF_ORDER,
    OverlapRanker,
    TinyRetriever,
    retrieval_order,
)

DEADLINE_S = 30.0  # nothing here waits for it

# Items whose text is far over a 40-character limit (the real limit is Settings.max_text_chars).
TEXT_LIMIT = 40
LONG_CATALOG = [
    *CATALOG,
    Item("L1", "Espresso grinder", description="espresso " * 50, category="kitchen"),
    Item("L2", "Camping tent", description="tent " * 80, category="outdoor"),
]


def gather(
    request: RecommendRequest,
    retriever: TinyRetriever | None = None,
    ranker: Any = None,
    policy: PoolPolicy | None = None,
) -> CandidatePool:
    retrieval = LocalRetrievalStage(retriever or TinyRetriever())
    ranking = LocalRankingStage(ranker or OverlapRanker())
    end = time.perf_counter() + DEADLINE_S
    return asyncio.run(gather_candidates(request, retrieval, ranking, policy or PoolPolicy(), end))


def request(**fields: Any) -> RecommendRequest:
    return RecommendRequest(**{"k": 8, "candidate_pool": 8, **fields})


# -- texts over the limit ----------------------------------------------------------------------


def test_texts_longer_than_the_limit_are_cut_for_ranking() -> None:
    long_items = {i.item_id: i for i in LONG_CATALOG}
    assert all(len(long_items[i].text()) > TEXT_LIMIT for i in ("L1", "L2"))
    pool = gather(
        request(query="espresso grinder", history_item_ids=("L2",)),
        TinyRetriever(catalog=LONG_CATALOG),
        policy=PoolPolicy(max_text_chars=TEXT_LIMIT),
    )
    candidates = {c.item_id: c for c in pool.candidates()}
    assert "L1" in candidates
    for item_id, candidate in candidates.items():
        assert candidate.text == long_items[item_id].text()[:TEXT_LIMIT]
    assert len(candidates["L1"].text) == TEXT_LIMIT
    assert candidates["c1"].text == long_items["c1"].text()  # short texts stay whole
    # The history item's text is cut too.
    assert [(h.item_id, h.text) for h in pool.context().history] == [
        ("L2", long_items["L2"].text()[:TEXT_LIMIT])
    ]


def real_ranker(catalog: list[Item], max_text_chars: int) -> Ranker:
    """ranking_service's Ranker over a small CF model, without a cross-encoder."""
    rng = np.random.default_rng(0)
    ids = [item.item_id for item in catalog]
    cf = CFModel(
        user_ids=["u1"],
        item_ids=ids,
        user_factors=rng.normal(size=(1, 4)).astype(np.float32),
        item_factors=rng.normal(size=(len(ids), 4)).astype(np.float32),
        regularization=0.1,
        alpha=1.0,
        iterations=1,
    )
    versions = {"bundle_version": "v-test", "cross_encoder": "", "cf": "als-4", "fusion": "convex"}
    return Ranker(cf, ConvexFusion(), None, versions, max_text_chars)


def test_recommend_over_long_texts_passes_the_real_rankers_validation() -> None:
    ranker = real_ranker(LONG_CATALOG, TEXT_LIMIT)
    long_item = next(i for i in LONG_CATALOG if i.item_id == "L1")
    # The real Ranker refuses a text over its limit: uncut texts would fail the Recommend.
    with pytest.raises(InvalidInput, match=r"candidates\[0\]\.text: \d+ chars, limit 40"):
        ranker.validate(RankContext(query="espresso"), [Candidate("L1", long_item.text(), 1.0)])

    settings = Settings(max_text_chars=TEXT_LIMIT)
    p = RecommendPipeline(
        LocalRetrievalStage(TinyRetriever(catalog=LONG_CATALOG)),
        LocalRankingStage(ranker),
        settings,
    )
    for fields in (
        {"query": "espresso grinder", "history_item_ids": ("L2",)},
        {"history_item_ids": ("L2", "r1"), "user_id": "u1"},  # CF's candidates as well
    ):
        answer = asyncio.run(p.recommend(request(**fields), DEADLINE_S))
        assert not answer.degraded, answer.degraded_reasons
        assert "L1" in {i.item_id for i in answer.items}
        assert all(i.scores.cf is not None for i in answer.items)  # the real ranker scored them


# -- GetItems calls within retrieval's limit ---------------------------------------------------


def test_get_items_calls_stay_within_max_ids_and_every_item_arrives() -> None:
    history = ("r1", "r4", "b1")
    recalled = [i for i in CF_ORDER if i not in history][:5]
    retriever = TinyRetriever(max_ids=2)  # refuses larger calls, as the real service does
    ranker = OverlapRanker()
    pool = gather(
        request(history_item_ids=history, candidate_pool=8),
        retriever,
        ranker,
        PoolPolicy(cf_share=0.75, max_ids_per_call=2),
    )
    assert ranker.recalls == [("", history, 6)]  # 0.75 of 8, more than one call's worth
    assert retriever.get_items_calls and all(len(c) <= 2 for c in retriever.get_items_calls)
    asked = [i for call in retriever.get_items_calls for i in call]
    assert sorted(asked) == sorted([*history, *recalled])
    # Every recalled item arrived, with its text, and the history kept its order.
    assert pool.recalled == len(recalled)
    cf_only = [p for p in pool.items if p.retrieval_score is None]
    assert {p.item_id for p in cf_only} == set(recalled) - {
        p.item_id for p in pool.items if p.retrieval_score is not None
    }
    assert all(p.item is not None and p.item.text() for p in pool.items)
    assert [h.item_id for h in pool.history] == list(history)


def test_the_pipeline_takes_the_get_items_limit_from_max_k() -> None:
    retriever = TinyRetriever(max_ids=2)
    ranker = OverlapRanker()
    settings = Settings(max_k=2, cf_candidate_share=0.75)
    p = RecommendPipeline(LocalRetrievalStage(retriever), LocalRankingStage(ranker), settings)
    history = ("r1", "r4", "b1")
    answer = asyncio.run(p.recommend(request(history_item_ids=history), DEADLINE_S))
    assert not answer.degraded, answer.degraded_reasons
    assert retriever.get_items_calls and all(len(c) <= 2 for c in retriever.get_items_calls)
    recalled = [i for i in CF_ORDER if i not in history][:6]
    assert set(recalled) <= {i.item_id for i in answer.items}
    assert {h.item_id for h in ranker.contexts[0].history} == set(history)


# -- what the pool holds, in which order ------------------------------------------------------


def test_pool_is_retrieval_hits_then_cf_items_retrieval_did_not_return() -> None:
    history, excluded = ("r1",), frozenset({"t1"})
    retriever, ranker = TinyRetriever(), OverlapRanker()
    pool = gather(
        request(history_item_ids=history, exclude_item_ids=excluded, candidate_pool=8),
        retriever,
        ranker,
        PoolPolicy(cf_share=0.5),
    )
    dense = retrieval_order(history_item_ids=history, top_k=4, exclude_item_ids={"r1", "t1"})
    recalled = [i for i in CF_ORDER if i not in {"r1", "t1"}][:4]
    overlap = set(dense) & set(recalled)
    assert overlap, "the case must have items both sources propose"
    ids = [p.item_id for p in pool.items]
    assert ids == dense + [i for i in recalled if i not in dense]
    assert len(ids) == len(set(ids))
    # An item both sources proposed is there once, as retrieval's hit with retrieval's score;
    # CF-only items have no retrieval score, but their CF score.
    first = pool.items[: len(dense)]
    rest = pool.items[len(dense) :]
    assert all(p.retrieval_score is not None for p in first)
    assert all(p.retrieval_score is None and p.cf_score is not None for p in rest)
    assert (pool.retrieved, pool.recalled) == (len(dense), len(recalled))
    # History and exclusions were excluded at both sources, and are not in the pool.
    assert not set(ids) & {"r1", "t1"}
    assert retriever.queries[0].exclude_item_ids == {"r1", "t1"}
    assert ranker.excludes[0] >= {"r1", "t1"}
    assert [c.item_id for c in pool.candidates()] == ids


def test_a_query_is_answered_from_retrieval_only() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    pool = gather(
        request(query="tent", user_id="u1", history_item_ids=("t1",), candidate_pool=6),
        retriever,
        ranker,
        PoolPolicy(cf_share=0.9),
    )
    assert ranker.recalls == [], "CF recall was asked for a request with a query"
    assert [q.top_k for q in retriever.queries] == [6]
    assert pool.recalled == 0 and pool.reasons == []
    ids = [p.item_id for p in pool.items]
    assert ids == retrieval_order(
        text="tent", history_item_ids=("t1",), top_k=6, exclude_item_ids={"t1"}
    )
    assert all(p.retrieval_score is not None for p in pool.items)
    assert [h.item_id for h in pool.history] == ["t1"]


def test_a_user_id_alone_is_answered_from_cf_only() -> None:
    retriever, ranker = TinyRetriever(), OverlapRanker()
    pool = gather(request(user_id="u1", candidate_pool=5), retriever, ranker)
    assert retriever.queries == [] and ranker.recalls == [("u1", (), 5)]
    assert [p.item_id for p in pool.items] == list(CF_ORDER[:5])
    assert all(p.retrieval_score is None for p in pool.items)
    assert pool.retrieved == 0 and pool.history == ()


# -- the new product's place -------------------------------------------------------------------


def test_a_recommendation_asks_for_the_new_product_nearest_the_latest_item_and_keeps_its_slot() -> (
    None
):
    retriever = TinyRetriever(new=frozenset({"t2", "r4"}))
    policy = PoolPolicy(new_item_slot=2)
    pool = gather(
        request(history_item_ids=("t1", "r1"), candidate_pool=4), retriever, policy=policy
    )
    lane = [q for q in retriever.queries if q.new_items_only]
    assert len(lane) == 1 and lane[0].top_k == 1
    assert lane[0].history_item_ids == ("t1",)  # the most recent item alone
    assert lane[0].exclude_item_ids == {"t1", "r1"}
    assert pool.new_item == "t2"  # the camping tent is nearer the tent than the shoes are
    assert pool.new_item_slot in (1, 2)
    assert "t2" in [p.item_id for p in pool.items]
    # Moved up to the slot when ranked lower; left where it is when ranked higher.
    assert with_new_item(["a", "b", "c", "t2"], str, pool.new_item, 2) == ["a", "t2", "b", "c"]
    assert with_new_item(["t2", "a", "b"], str, pool.new_item, 2) == ["t2", "a", "b"]
    assert with_new_item(["a", "b", "c", "t2"], str, pool.new_item, 0) == ["a", "b", "c", "t2"]
    answer = asyncio.run(
        RecommendPipeline(
            LocalRetrievalStage(retriever),
            LocalRankingStage(OverlapRanker()),
            Settings.built_in(new_item_slot=2),
        ).recommend(request(history_item_ids=("t1", "r1"), candidate_pool=4, k=3), DEADLINE_S)
    )
    assert "t2" in [i.item_id for i in answer.items[:2]]


def test_the_new_products_position_follows_its_cosine_to_the_latest_item() -> None:
    retriever = TinyRetriever(new=frozenset({"t2"}))
    (hit,), _ = retriever.search(
        SearchQuery(top_k=1, history_item_ids=("t1",), new_items_only=True)
    )
    above = float(np.nextafter(hit.score, 2.0))
    for lead, near, slot in ((hit.score, -1.0, 1), (above, hit.score, 2), (above, above, 0)):
        policy = PoolPolicy(
            new_item_slot=2, new_item_min_similarity=near, new_item_lead_similarity=lead
        )
        pool = gather(
            request(history_item_ids=("t1", "r1"), candidate_pool=4), retriever, policy=policy
        )
        assert (pool.new_item, pool.new_item_slot) == ("t2", slot)
        assert "t2" in [p.item_id for p in pool.items]  # ranking scores it, slot or not


def test_searches_and_a_slot_of_0_ask_for_no_new_product() -> None:
    for policy, fields in (
        (PoolPolicy(new_item_slot=2), {"query": "camping tent", "history_item_ids": ("t1",)}),
        (PoolPolicy(new_item_slot=0), {"history_item_ids": ("t1",)}),
    ):
        retriever = TinyRetriever(new=frozenset({"t2"}))
        pool = gather(request(**fields), retriever, policy=policy)
        assert not any(q.new_items_only for q in retriever.queries)
        assert (pool.new_item, pool.new_item_slot) == (None, 0)
