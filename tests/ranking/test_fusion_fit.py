"""Fitting the two passes: the cross-encoder is kept where it raises held-out NDCG, skipped where
it does not, the depth sweep is recorded, and too few lists fall back to the convex mix."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ranking_service.features import FEATURES, StageScores
from ranking_service.fusion import ConvexFusion, TwoPassFusion
from ranking_service.fusion_fit import (
    COPY_SPEEDUP,
    MIN_LISTS,
    FusionList,
    choose_depth,
    first_pass_features,
    fit_two_pass,
    group_verdict,
    servable_depths,
    sweep_sample,
    within_budget,
)

POOL = 40


def synthetic_lists(n: int, ce_signal: float, seed: int = 0) -> list[FusionList]:
    """Lists where CF finds relevant items roughly and a hidden 'true' score says which are
    relevant; the cross-encoder reads that hidden score with `ce_signal` of its weight."""
    rng = np.random.default_rng(seed)
    lists = []
    for k in range(n):
        truth = rng.normal(size=POOL)
        labels = (truth > np.sort(truth)[-3]).astype(np.float64)  # two relevant items
        cf = truth + 1.5 * rng.normal(size=POOL)
        texts = tuple(f"{ce_signal}|{t}|{rng.normal()}" for t in truth)
        lists.append(
            FusionList(StageScores(cf=cf, popularity=rng.normal(size=POOL)), labels, f"c{k}", texts)
        )
    return lists


class CountingScorer:
    """A 'cross-encoder' that reads the hidden truth out of the item text, plus noise."""

    def __init__(self) -> None:
        self.pairs = 0

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        self.pairs += len(pairs)
        out = []
        for _, text in pairs:
            signal, truth, noise = (float(v) for v in text.split("|"))
            out.append(signal * truth + (1 - signal) * noise)
        return np.array(out, np.float32)


def test_the_first_pass_never_sees_the_cross_encoder() -> None:
    scores = StageScores(cf=np.array([1.0, 2.0]), ce=np.array([5.0, -5.0]))
    with_ce = first_pass_features(scores)
    without = first_pass_features(StageScores(cf=np.array([1.0, 2.0])))
    np.testing.assert_array_equal(with_ce, without)


def test_a_cross_encoder_that_knows_relevance_is_used_at_a_swept_depth() -> None:
    scorer = CountingScorer()
    lists = synthetic_lists(60, ce_signal=0.9)
    fused = fit_two_pass(lists, scorer, ConvexFusion(), requests="users", depths=(5, 10, 20))
    record = fused.fitted_on
    assert fused.cross_encoder_pays and fused.second is not None
    assert [row["depth"] for row in record["sweep"]] == [5, 10, 20]
    best = max(row["ndcg@10"] for row in record["sweep"])
    assert best > record["first_pass_ndcg@10"]
    assert fused.rerank_depth in (5, 10, 20)
    # Only the first pass's top 20 of each list were ever scored.
    assert scorer.pairs == 60 * 20
    # The second pass leans on the cross-encoder.
    assert fused.second.to_dict()["weights"][0] > 0


def test_a_cross_encoder_of_noise_is_skipped_but_its_second_pass_kept() -> None:
    fused = fit_two_pass(
        synthetic_lists(60, ce_signal=0.0), CountingScorer(), ConvexFusion(), requests="users"
    )
    assert not fused.cross_encoder_pays
    # Kept so that an operator can still force it (rerank_kinds=all).
    assert fused.second is not None and fused.rerank_depth > 0


def test_without_a_cross_encoder_only_the_first_pass_is_fitted() -> None:
    fused = fit_two_pass(synthetic_lists(30, 0.5), None, ConvexFusion(), requests="users")
    assert fused.second is None and not fused.cross_encoder_pays
    assert "first_pass_ndcg@10" in fused.fitted_on and "sweep" not in fused.fitted_on


def test_too_few_lists_fall_back_to_the_convex_mix() -> None:
    lists = synthetic_lists(MIN_LISTS - 1, 0.5)
    fallback = ConvexFusion(alpha=0.6)
    fused = fit_two_pass(lists, CountingScorer(), fallback, requests="held-out queries")
    assert isinstance(fused, TwoPassFusion)
    assert fused.first is fallback and fused.second is fallback and fused.cross_encoder_pays
    assert f"only {MIN_LISTS - 1} held-out queries" in fused.fitted_on["fallback"]
    # Lists without a relevant candidate do not count.
    empty = [FusionList(f.scores, np.zeros(POOL), f.context, f.texts) for f in lists]
    assert "only 0" in fit_two_pass(empty * 3, None, fallback, "users").fitted_on["fallback"]


def test_the_chosen_depth_is_the_smallest_that_pays_and_is_near_the_best() -> None:
    sweep = [
        {"depth": 10, "ndcg@10": 0.775},
        {"depth": 20, "ndcg@10": 0.7803},
        {"depth": 30, "ndcg@10": 0.7803},
        {"depth": 50, "ndcg@10": 0.7873},
    ]
    # Only depth 50 beats the first pass (0.7783) by 1%: depth 20 is near the best but not a gain.
    assert choose_depth(sweep, 0.7783) == (50, True)
    assert choose_depth(sweep, 0.70) == (20, True)
    assert choose_depth(sweep, 0.79) == (50, False)
    # A gain within noise of the first pass (under GAIN_Z standard errors) does not pay.
    noisy = [{**row, "gain_se": 0.06} for row in sweep]
    assert choose_depth(noisy, 0.70) == (50, False)
    assert choose_depth([{**r, "gain_se": 0.001} for r in sweep], 0.70) == (20, True)


def test_the_first_pass_fits_on_every_list_and_the_cross_encoder_only_on_the_sample() -> None:
    scorer = CountingScorer()
    lists = synthetic_lists(80, ce_signal=0.9)
    fused = fit_two_pass(lists, scorer, ConvexFusion(), "users", depths=(5, 10), sweep_lists=30)
    assert fused.first.fitted_on["lists"] == 80
    assert fused.fitted_on["sweep_lists"] == 30
    assert scorer.pairs == 30 * 10
    assert sweep_sample(lists, 30) == lists[:30]
    # A sample too small to sweep on leaves the first pass alone.
    alone = fit_two_pass(lists, scorer, ConvexFusion(), "users", sweep_lists=MIN_LISTS - 1)
    assert alone.second is None and not alone.cross_encoder_pays


def test_the_time_budget_cuts_the_depth_and_refits_the_second_pass_there() -> None:
    lists = synthetic_lists(60, ce_signal=0.9)
    fused = fit_two_pass(lists, CountingScorer(), ConvexFusion(), "users", depths=(5, 10, 20))
    # Sweep rows all pay by construction here: force the deepest so the budget has to cut it.
    deepest = TwoPassFusion(
        fused.first, fused.second, 20, True, {**fused.fitted_on, "requests": "users"}
    )
    # 1000 pairs/s: depth 20 costs 20 ms, depth 10 costs 10 ms.
    fits = within_budget(deepest, lists, CountingScorer(), pairs_per_s=1000, budget_ms=12)
    assert fits.rerank_depth in (5, 10) and fits.cross_encoder_pays
    assert fits.second is not fused.second
    assert fits.fitted_on["ms_per_request"] <= 12 and fits.fitted_on["rerank_budget_ms"] == 12
    # Within budget: unchanged apart from the record.
    same = within_budget(deepest, lists, CountingScorer(), pairs_per_s=1000, budget_ms=25)
    assert same.rerank_depth == 20 and same.second is fused.second
    # No depth fits: the cross-encoder is skipped for this kind.
    none = within_budget(deepest, lists, CountingScorer(), pairs_per_s=100, budget_ms=10)
    assert not none.cross_encoder_pays and none.fitted_on["over_budget"]
    # The convex fallback has no sweep: only its depth is cut.
    fallback = fit_two_pass(lists[: MIN_LISTS - 1], CountingScorer(), ConvexFusion(), "users")
    cut = within_budget(fallback, lists, CountingScorer(), pairs_per_s=1000, budget_ms=12)
    assert cut.rerank_depth == 12 and cut.cross_encoder_pays


def with_content(lists: Sequence[FusionList], signal: float, seed: int = 1) -> list[FusionList]:
    """The lists with content similarities that read relevance with `signal` of their weight."""
    rng = np.random.default_rng(seed)
    out = []
    for f in lists:
        nearest = signal * f.labels + (1 - signal) * rng.normal(size=len(f.labels))
        scores = replace(f.scores, content_nearest=nearest, content_recent=rng.normal(size=POOL))
        out.append(replace(f, scores=scores))
    return out


def test_content_similarity_that_knows_relevance_is_kept() -> None:
    lists = with_content(synthetic_lists(60, 0.5), signal=0.8)
    fused = fit_two_pass(lists, None, ConvexFusion(), requests="users")
    verdict = fused.fitted_on["content_similarity"]
    assert verdict["pays"] and verdict["ndcg@10 with"] > verdict["ndcg@10 without"]
    assert fused.first.to_dict()["weights"][FEATURES.index("content_nearest")] > 0
    assert group_verdict(lists, "content") == verdict


def test_content_similarity_of_noise_weighs_nothing_in_either_pass() -> None:
    lists = with_content(synthetic_lists(60, 0.9), signal=0.0)
    fused = fit_two_pass(lists, CountingScorer(), ConvexFusion(), "users", depths=(5, 10))
    assert not fused.fitted_on["content_similarity"]["pays"]
    assert fused.second is not None
    for fusion in (fused.first, fused.second):
        weights = fusion.to_dict()["weights"]
        assert weights[FEATURES.index("content_nearest")] == 0.0
        assert weights[FEATURES.index("content_recent")] == 0.0
    # Lists without content (searches) record no verdict.
    assert (
        "content_similarity"
        not in fit_two_pass(
            lists[:0] + synthetic_lists(30, 0.5), None, ConvexFusion(), "users"
        ).fitted_on
    )


def test_the_first_pass_may_learn_from_more_lists_than_the_cross_encoder_sees() -> None:
    scorer = CountingScorer()
    held, tuned = synthetic_lists(20, 0.9), synthetic_lists(50, 0.9, seed=3)
    fused = fit_two_pass(
        held, scorer, ConvexFusion(), "queries", depths=(5,), first_lists=held + tuned
    )
    assert fused.first.fitted_on["lists"] == 70 and fused.fitted_on["first_pass_lists"] == 70
    assert fused.fitted_on["lists"] == 20 and scorer.pairs == 20 * 5
    # Enough lists for the first pass, too few held out for the cross-encoder: first pass only.
    few = fit_two_pass(
        held[: MIN_LISTS - 1], scorer, ConvexFusion(), "queries", first_lists=held + tuned
    )
    assert few.first.fitted_on["lists"] == 70 and few.second is None


def test_depths_no_copy_could_serve_in_budget_are_not_swept() -> None:
    # 100 pairs/s: the fastest copy scores at most 100 * COPY_SPEEDUP pairs/s.
    fastest = 100 * COPY_SPEEDUP
    assert servable_depths((10, 20, 50), 100, budget_ms=1000 * 20 / fastest) == [10, 20]
    # The smallest depth is always swept: the budget's verdict on it comes from the copy's speed.
    assert servable_depths((10, 20, 50), 100, budget_ms=1e-6) == [10]
    lists = synthetic_lists(40, ce_signal=0.9)
    scorer = CountingScorer()
    cut = fit_two_pass(lists, scorer, ConvexFusion(), "users", depths=(5, 10, 20), budget_ms=1e-6)
    assert [row["depth"] for row in cut.fitted_on["sweep"]] == [5]
    assert cut.fitted_on["not_swept"]["depths"] == [10, 20]
    assert scorer.pairs == 40 * 5  # the deeper heads were never scored
    scorer = CountingScorer()
    whole = fit_two_pass(lists, scorer, ConvexFusion(), "users", depths=(5, 10, 20), budget_ms=1e9)
    assert [row["depth"] for row in whole.fitted_on["sweep"]] == [5, 10, 20]
    assert "not_swept" not in whole.fitted_on
    assert scorer.pairs == 40 * 20  # each pair once, the shallow head's included
