"""Ranker: rank and combine over a small shop's CF, the sample bundle's cross-encoder, CF recall
for known, folded-in and unknown users, validation, and the event loop staying free meanwhile."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.batching import DynamicBatcher
from ranking_service.cf import CFModel
from ranking_service.copies import DIRS
from ranking_service.features import FEATURES
from ranking_service.fusion import (
    ContextFusion,
    ConvexFusion,
    LogisticFusion,
    TwoPassFusion,
)
from ranking_service.ranker import CROSS_ENCODER_SKIPPED, Ranker, RankOutcome
from recsys.app.sample import sample_paths
from recsys.core.bundle import Bundle
from recsys.core.domain import Candidate, HistoryItem, RankContext
from recsys.core.errors import InvalidInput, NotFound
from recsys.core.settings import Settings


@pytest.fixture(scope="module")
def ranker(sample_bundle_root: Path) -> Ranker:
    return Ranker.load(Bundle.open(sample_bundle_root), Settings(device="cpu"))


@pytest.fixture(scope="module")
def known_user() -> tuple[str, list[str]]:
    log = pd.read_csv(sample_paths()[1], dtype={"user_id": str, "item_id": str})
    user = str(log["user_id"].value_counts().index[0])
    return user, [str(i) for i in log.loc[log["user_id"] == user, "item_id"]]


def test_recall_for_a_known_user_is_cf_order_without_excluded_items(
    ranker: Ranker, known_user: tuple[str, list[str]]
) -> None:
    user, items = known_user
    # ALS's list alone (the served recall merges the item-to-item model's lists into it).
    als = ranker.with_cf(ranker.cf, None)
    for served in (als, ranker):
        recall = served.recall(user, items[:2], 10, exclude=frozenset(items[2:4]))
        ids = [i for i, _ in recall.items]
        assert len(ids) == 10 and not recall.cf_folded_in
        # Neither the request's history and exclusions nor what the user had at training.
        assert not set(ids) & set(items)
        scores = [s for _, s in recall.items]
        assert scores == sorted(scores, reverse=True)
    assert set(ranker.cf.items_of(user)) == set(items)
    recall = als.recall(user, items[:2], 10, exclude=frozenset(items[2:4]))
    ids, scores = [i for i, _ in recall.items], [s for _, s in recall.items]
    vector = ranker.cf.user_vector(user)
    assert vector is not None
    np.testing.assert_allclose(scores, ranker.cf.scores(vector, ids), rtol=1e-5)


def test_recall_folds_in_an_unknown_user_from_history(
    ranker: Ranker, known_user: tuple[str, list[str]]
) -> None:
    _, items = known_user
    recall = ranker.recall("", items, 5)
    assert recall.cf_folded_in and len(recall.items) == 5
    assert not {i for i, _ in recall.items} & set(items)


def test_recall_without_anything_cf_knows_is_not_found(ranker: Ranker) -> None:
    with pytest.raises(NotFound, match="user_id 'stranger'"):
        ranker.recall("stranger", ["no-such-item"], 5)
    with pytest.raises(NotFound, match="history_item_ids"):
        ranker.recall("", ["no-such-item"], 5)


class SlowCF(CFModel):
    """The real CF whose fold-in also blocks its thread a while, as a large model's solve does."""

    def fold_in(
        self, item_ids: Sequence[str], weights: Sequence[float] | None = None
    ) -> np.ndarray | None:
        time.sleep(0.1)
        return super().fold_in(item_ids, weights)


@pytest.fixture(scope="module")
def shop_cf(shop_interactions: pd.DataFrame) -> CFModel:
    return CFModel.train(shop_interactions, factors=8, iterations=10)


@pytest.fixture(scope="module")
def shop_ranker(shop_cf: CFModel) -> Ranker:
    """CF and convex fusion, no cross-encoder: what a bundle built without one serves."""
    return Ranker(shop_cf, ConvexFusion(), None, {})


def running_context(user_id: str = "") -> RankContext:
    """A Running shopper's history (department D0), most recent first."""
    return RankContext(
        user_id=user_id,
        history=(HistoryItem("D0I0", "Trail running shoes"), HistoryItem("D0I1", "Road flats")),
    )


def shop_candidates() -> list[Candidate]:
    """Two Running and two Coffee products, and one item CF never saw."""
    ids = ["D1I0", "D0I2", "new-item", "D1I3", "D0I3"]
    return [Candidate(i, f"product {i}") for i in ids]


def test_rank_returns_every_candidate_once_best_fused_first(shop_ranker: Ranker) -> None:
    candidates = shop_candidates()
    outcome = asyncio.run(shop_ranker.rank(running_context(), candidates))
    ids = [s.item_id for s in outcome.scored]
    assert sorted(ids) == sorted(c.item_id for c in candidates)
    fused = [s.scores.fused for s in outcome.scored]
    assert fused == sorted(fused, reverse=True)
    # CF folds the Running shopper in from history and puts Running products first.
    assert outcome.cf_folded_in and set(ids[:2]) == {"D0I2", "D0I3"}
    by_id = {s.item_id: s.scores for s in outcome.scored}
    assert by_id["new-item"].cf is None
    assert all(by_id[i].cf is not None for i in ids if i != "new-item")
    # No cross-encoder in this ranker, and no retrieval scores in the request.
    assert all(
        s.scores.cross_encoder is None and s.scores.retrieval is None for s in outcome.scored
    )


def test_rank_matches_combine_without_cross_encoder_scores(shop_ranker: Ranker) -> None:
    context, candidates = running_context(), shop_candidates()
    assert asyncio.run(shop_ranker.rank(context, candidates)) == shop_ranker.combine(
        context, candidates, None
    )


def test_rank_of_a_known_user_uses_their_trained_vector(shop_ranker: Ranker) -> None:
    outcome = asyncio.run(shop_ranker.rank(RankContext(user_id="U00"), shop_candidates()))
    assert not outcome.cf_folded_in
    assert {s.item_id for s in outcome.scored[:2]} == {"D0I2", "D0I3"}


def test_rank_of_no_candidates_is_empty(shop_ranker: Ranker) -> None:
    outcome = asyncio.run(shop_ranker.rank(running_context(), []))
    assert outcome.scored == [] and not outcome.cf_folded_in


def test_combine_orders_by_fusion_of_the_given_cross_encoder_scores(shop_cf: CFModel) -> None:
    candidates = shop_candidates()
    ce = np.array([5.0, -1.0, 3.0, 0.5, 1.0], np.float32)
    # All weight on the cross-encoder: its order, whatever CF thinks.
    ce_only = Ranker(shop_cf, ConvexFusion(alpha=1.0), None, {})
    outcome = ce_only.combine(running_context(), candidates, ce)
    assert [s.item_id for s in outcome.scored] == ["D1I0", "new-item", "D0I3", "D1I3", "D0I2"]
    by_id = {s.item_id: s.scores for s in outcome.scored}
    assert [by_id[c.item_id].cross_encoder for c in candidates] == ce.tolist()
    # A blend: fused is the fusion of every stage's scores, sorted best first.
    blend = Ranker(shop_cf, ConvexFusion(alpha=0.5), None, {})
    context = RankContext(query="coffee", history=running_context().history)
    stages, folded = blend.stage_scores(context, candidates)
    expected = blend.fusion.fuse(replace(stages, ce=ce))
    outcome = blend.combine(context, candidates, ce)
    assert outcome.cf_folded_in == folded
    assert [s.item_id for s in outcome.scored] == [
        candidates[i].item_id for i in np.argsort(-expected, kind="stable")
    ]
    np.testing.assert_allclose(
        [s.scores.fused for s in outcome.scored], np.sort(expected)[::-1], rtol=1e-6
    )


@pytest.mark.parametrize(
    ("context", "candidates", "field"),
    [
        (RankContext(query="q" * 21), [Candidate("a", "ok")], "context.query"),
        (RankContext(), [Candidate("a", "ok"), Candidate("b", "t" * 21)], r"candidates\[1\]\.text"),
        (
            RankContext(),
            [Candidate("a", "ok"), Candidate("a", "again")],
            r"candidates\[1\]\.item_id: duplicate 'a'",
        ),
        (RankContext(), [Candidate("", "ok")], r"candidates\[0\]\.item_id: empty"),
        (
            RankContext(history=(HistoryItem("a", "h" * 21),)),
            [Candidate("b", "ok")],
            r"context\.history\[0\]\.text",
        ),
    ],
)
def test_rank_rejects_invalid_input_naming_the_field(
    shop_cf: CFModel, context: RankContext, candidates: list[Candidate], field: str
) -> None:
    ranker = Ranker(shop_cf, ConvexFusion(), None, {}, max_text_chars=20)
    with pytest.raises(InvalidInput, match=field):
        asyncio.run(ranker.rank(context, candidates))


def test_rank_with_the_cross_encoder_scores_only_with_a_context(sample_bundle_root: Path) -> None:
    catalog = pd.read_csv(sample_paths()[0], dtype={"item_id": str}).head(6)
    candidates = [Candidate(str(r.item_id), str(r.title)) for r in catalog.itertuples()]
    candidates.append(Candidate("no-such-item", "Trail running shoes"))

    async def rank_twice() -> tuple[list[float | None], list[float | None]]:
        # A fresh ranker: its batcher's worker lives on this test's event loop.
        # Whatever the bundle found, the cross-encoder scores every kind here.
        settings = Settings.built_in(device="cpu", rerank_kinds="all")
        ranker = Ranker.load(Bundle.open(sample_bundle_root), settings)
        ranker.start()
        try:
            query = await ranker.rank(RankContext(query="noise-cancelling headphones"), candidates)
            empty = await ranker.rank(RankContext(), candidates)
        finally:
            await ranker.close()
        return (
            [s.scores.cross_encoder for s in query.scored],
            [s.scores.cross_encoder for s in empty.scored],
        )

    with_query, without_context = asyncio.run(rank_twice())
    assert len(with_query) == len(candidates) and all(s is not None for s in with_query)
    assert all(s is None for s in without_context)


def test_rank_leaves_the_event_loop_free_while_cf_folds_in(
    shop_interactions: pd.DataFrame,
) -> None:
    # Two fold-ins (whole history and recent items) of 0.1 s each: ~40 ticks of 5 ms when off
    # the loop, none when they block it.
    ranker = Ranker(
        SlowCF.train(shop_interactions, factors=8, iterations=2), ConvexFusion(), None, {}
    )

    async def ticks_during_rank() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)  # the ticker is waiting on its first sleep
        try:
            before = ticks
            outcome = await ranker.rank(running_context(), shop_candidates())
            assert len(outcome.scored) == len(shop_candidates())
            return ticks - before
        finally:
            task.cancel()

    assert asyncio.run(ticks_during_rank()) >= 3


class RecordingScorer:
    """Scores a pair by its item text's length, and remembers every pair it was given."""

    def __init__(self) -> None:
        self.pairs: list[tuple[str, str]] = []

    def __call__(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        self.pairs.extend(pairs)
        return np.array([float(len(item)) for _, item in pairs], np.float32)


def by_feature(name: str) -> LogisticFusion:
    return LogisticFusion([1.0 if f == name else 0.0 for f in FEATURES], 0.0)


def two_pass_ranker(
    cf: CFModel, history_pays: bool, **overrides: object
) -> tuple[Ranker, RecordingScorer]:
    """First pass by CF alone, second by the cross-encoder alone, over the top 2."""
    first, second = by_feature("cf"), by_feature("ce")
    fusion = ContextFusion(
        query=TwoPassFusion(first, second, rerank_depth=2, cross_encoder_pays=True),
        history=TwoPassFusion(first, second, rerank_depth=2, cross_encoder_pays=history_pays),
    )
    scorer = RecordingScorer()
    batcher = DynamicBatcher(scorer, max_batch_pairs=64, max_wait_s=0.001, max_queue_pairs=1024)
    versions = {"bundle_version": "v1", "cross_encoder": "v1/cross_encoder", "fusion": "by_context"}
    return Ranker(cf, fusion, batcher, versions, **overrides), scorer  # type: ignore[arg-type]


def rank_once(ranker: Ranker, context: RankContext, candidates: list[Candidate]) -> RankOutcome:
    async def run() -> RankOutcome:
        ranker.start()
        try:
            return await ranker.rank(context, candidates)
        finally:
            await ranker.close()

    return asyncio.run(run())


def texts_by_length() -> list[Candidate]:
    """The shop's candidates with texts whose length (the recording scorer's score) differs."""
    return [Candidate(c.item_id, "x" * (5 + 3 * k)) for k, c in enumerate(shop_candidates())]


def test_the_cross_encoder_scores_only_the_first_pass_head(shop_cf: CFModel) -> None:
    ranker, scorer = two_pass_ranker(shop_cf, history_pays=True)
    candidates = texts_by_length()
    context = RankContext(query="running", history=running_context().history)
    first = by_feature("cf").fuse(ranker.stage_scores(context, candidates)[0])
    top_two = {candidates[i].item_id for i in np.argsort(-first)[:2]}
    outcome = rank_once(ranker, context, candidates)
    assert {c.text for c in candidates if c.item_id in top_two} == {t for _, t in scorer.pairs}
    assert len(scorer.pairs) == 2
    # The head comes first, ordered by the cross-encoder; the rest follow in the first pass's
    # order and carry no cross-encoder score.
    head, tail = outcome.scored[:2], outcome.scored[2:]
    assert {s.item_id for s in head} == top_two
    assert head[0].scores.cross_encoder is not None and head[1].scores.cross_encoder is not None
    assert head[0].scores.cross_encoder >= head[1].scores.cross_encoder
    assert all(s.scores.cross_encoder is None for s in tail)
    assert [s.scores.fused for s in outcome.scored] == sorted(
        (s.scores.fused for s in outcome.scored), reverse=True
    )
    assert outcome.versions["cross_encoder"] == "v1/cross_encoder"
    # The offline path agrees, given scores for every candidate or only for those it reranks.
    all_scores = np.array([float(len(c.text)) for c in candidates], np.float32)
    assert ranker.combine(context, candidates, all_scores) == outcome
    rows = ranker.rerank_rows(context, candidates)
    assert {candidates[i].item_id for i in rows} == top_two
    only_head = np.full(len(candidates), np.nan, np.float32)
    only_head[rows] = all_scores[rows]
    assert ranker.combine(context, candidates, only_head) == outcome


def test_a_kind_the_cross_encoder_does_not_pay_for_skips_it(shop_cf: CFModel) -> None:
    ranker, scorer = two_pass_ranker(shop_cf, history_pays=False)
    outcome = rank_once(ranker, running_context(), texts_by_length())
    assert scorer.pairs == [] and ranker.rerank_rows(running_context(), texts_by_length()).size == 0
    assert outcome.versions["cross_encoder"] == CROSS_ENCODER_SKIPPED
    assert all(s.scores.cross_encoder is None for s in outcome.scored)
    assert {s.item_id for s in outcome.scored[:2]} == {"D0I2", "D0I3"}  # CF's order


def test_settings_override_the_bundle_plan(shop_cf: CFModel) -> None:
    ranker, scorer = two_pass_ranker(
        shop_cf, history_pays=False, rerank_depth=3, rerank_all_kinds=True
    )
    outcome = rank_once(ranker, running_context(), texts_by_length())
    assert len(scorer.pairs) == 3 and outcome.versions["cross_encoder"] == "v1/cross_encoder"
    off, off_scorer = two_pass_ranker(shop_cf, history_pays=True, rerank_depth=0)
    skipped = rank_once(off, running_context(), texts_by_length())
    assert off_scorer.pairs == [] and skipped.versions["cross_encoder"] == CROSS_ENCODER_SKIPPED


def test_the_copy_of_the_cross_encoder_that_serves_is_the_validated_one(
    sample_bundle_root: Path,
) -> None:
    bundle = Bundle.open(sample_bundle_root)
    validated = bundle.manifest["cross_encoder"]["serving_copy"]
    served = Ranker.load(bundle, Settings.built_in(device="cpu")).versions["cross_encoder"]
    assert served == f"{bundle.version}/{DIRS[validated]}"
    for copy in ("fp32", "int8", "student", "student_int8"):
        ranker = Ranker.load(bundle, Settings.built_in(device="cpu", cross_encoder_copy=copy))
        assert ranker.versions["cross_encoder"] == f"{bundle.version}/{DIRS[copy]}"
