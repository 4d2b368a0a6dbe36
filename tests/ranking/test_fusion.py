"""Fusion: per-request standardisation, missing scores handled, learned weights, file round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ranking_service.features import FEATURES, StageScores, features, normalise
from ranking_service.fusion import (
    FUSION_KINDS,
    RERANK_ALL,
    ContextFusion,
    ConvexFusion,
    LogisticFusion,
    TwoPassFusion,
    load_fusion,
    plan_for,
    save_fusion,
)
from ranking_service.plan import place_head
from recsys.core.errors import InvalidInput


def test_normalise_keeps_nan_and_flattens_constants() -> None:
    z = normalise(np.array([1.0, 2.0, np.nan, 3.0]))
    assert np.isnan(z[2]) and z[0] < z[1] < z[3] and abs(np.nanmean(z)) < 1e-9
    assert (normalise(np.array([5.0, 5.0])) == 0).all()


def test_missing_cf_is_not_a_penalty() -> None:
    fusion = ConvexFusion(alpha=0.5)
    ce = np.array([1.0, 1.0, 0.0])
    cf = np.array([0.0, np.nan, 0.5])  # item 1 is cold: CF cannot score it
    fused = fusion.fuse(StageScores(cf=cf, ce=ce))
    # Same cross-encoder score; the cold item is judged on what exists, not on a made-up 0.
    z_cf = normalise(cf)
    assert fused[1] == pytest.approx(normalise(ce)[1])
    assert fused[0] == pytest.approx(0.5 * normalise(ce)[0] + 0.5 * z_cf[0])


def test_without_cf_retrieval_takes_its_place() -> None:
    fused = ConvexFusion(alpha=0.5).fuse(
        StageScores(cf=np.full(2, np.nan), ce=np.array([0.0, 0.0]), retrieval=np.array([0.9, 0.1]))
    )
    assert fused[0] > fused[1]


def test_logistic_fusion_learns_which_signal_matters() -> None:
    rng = np.random.default_rng(0)
    x_lists, y_lists = [], []
    for _ in range(50):
        ce, cf, ret = rng.normal(size=(3, 20))
        y = (cf + 0.1 * rng.normal(size=20) > 1.0).astype(float)  # only CF predicts relevance
        x_lists.append(features(StageScores(cf=cf, ce=ce, retrieval=ret)))
        y_lists.append(y)
    model = LogisticFusion.fit(np.vstack(x_lists), np.concatenate(y_lists))
    weights = dict(zip(["ce", "cf", "retrieval"], model.weights[:3], strict=False))
    assert weights["cf"] > 3 * abs(weights["ce"]) and weights["cf"] > 3 * abs(weights["retrieval"])


def test_save_load_and_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    model = LogisticFusion(
        weights=[0.3 * (k % 7) - 0.8 for k in range(len(FEATURES))],
        bias=0.1,
    )
    save_fusion(model, path)
    loaded = load_fusion(path)
    scores = StageScores(
        cf=np.array([np.nan, 1.0]),
        ce=np.array([0.1, 0.9]),
        retrieval=np.array([0.3, np.nan]),
        popularity=np.array([2.0, 1.0]),
        cf_recent=np.array([0.5, 0.7]),
        content_nearest=np.array([0.2, 0.8]),
        content_recent=np.array([0.9, 0.4]),
        lexical=np.array([3.0, np.nan]),
        item_item=np.array([np.nan, 0.2]),
        transitions=np.array([0.5, 1.5]),
    )
    np.testing.assert_allclose(loaded.fuse(scores), model.fuse(scores))
    path.write_text('{"kind": "magic"}')
    with pytest.raises(InvalidInput, match=r"fusion\.json"):
        load_fusion(path)


def test_missing_cf_is_not_ranked_below_an_average_cf_item() -> None:
    ce = np.array([2.0, 2.0, 0.0, -1.0])
    cf = np.array([np.nan, 0.5, 0.9, 0.1])  # item 0 is cold; item 1 has the average CF score
    fused = ConvexFusion().fuse(StageScores(cf=cf, ce=ce))
    assert normalise(cf)[1] == pytest.approx(0.0)
    assert fused[0] >= fused[1]


def test_without_the_cross_encoder_retrieval_stands_in_for_it() -> None:
    cf = np.array([0.2, 0.2, 0.2])  # CF cannot tell them apart
    retrieval = np.array([0.1, 0.9, 0.5])
    fused = ConvexFusion().fuse(StageScores(cf=cf, retrieval=retrieval))
    assert list(np.argsort(-fused)) == [1, 2, 0]
    # Nothing but retrieval: its order, and without retrieval either, zeros rather than NaN.
    only = ConvexFusion().fuse(StageScores(cf=np.full(3, np.nan), retrieval=retrieval))
    assert list(np.argsort(-only)) == [1, 2, 0]
    assert (ConvexFusion().fuse(StageScores(cf=np.full(2, np.nan))) == 0).all()


def test_convex_round_trip_and_registry(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    save_fusion(ConvexFusion(alpha=0.4), path)
    loaded = load_fusion(path)
    assert isinstance(loaded, ConvexFusion) and loaded.alpha == 0.4
    assert {"convex", "logistic"} <= set(FUSION_KINDS)
    with pytest.raises(InvalidInput, match="alpha"):
        ConvexFusion(alpha=1.5)
    path.write_text('{"kind": "logistic", "weights": [1.0]}')  # no bias
    with pytest.raises(InvalidInput, match=r"fusion\.json"):
        load_fusion(path)


def test_older_fusion_files_load_with_the_new_features_weighing_nothing(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    old = ["ce", "cf", "retrieval", "cf_missing", "ce_missing"]
    path.write_text(
        f'{{"kind": "logistic", "features": {json.dumps(old)}, '
        '"weights": [1, 2, 0.5, -1, 0], "bias": 0.1}'
    )
    loaded = load_fusion(path)
    assert isinstance(loaded, LogisticFusion)
    assert loaded.weights == [1, 2, 0.5, -1, 0] + [0.0] * (len(FEATURES) - len(old))
    path.write_text('{"kind": "logistic", "features": ["cf", "ce"], "weights": [1, 2], "bias": 0}')
    with pytest.raises(InvalidInput, match="prefix"):
        load_fusion(path)


def test_features_mark_each_missing_stage() -> None:
    scores = StageScores(
        cf=np.array([1.0, np.nan, 3.0]),
        ce=np.array([0.5, 0.1, 0.2]),
        retrieval=np.array([0.9, 0.8, np.nan]),
        popularity=np.array([1.0, 2.0, 3.0]),
    )
    x = dict(zip(FEATURES, features(scores).T, strict=True))
    assert list(x["cf_missing"]) == [0, 1, 0] and list(x["retrieval_missing"]) == [0, 0, 1]
    assert list(x["ce_missing"]) == [0, 0, 0]
    assert x["cf"][1] == 0 and x["retrieval"][2] == 0  # a missing score adds nothing by itself
    assert x["popularity"][2] > x["popularity"][0]
    no_ce = features(StageScores(cf=np.ones(2)))
    assert list(no_ce[:, FEATURES.index("ce_missing")]) == [1, 1]


def test_a_product_treated_as_new_keeps_only_what_its_text_says() -> None:
    content = np.array([0.9, 0.1, 0.5, 0.3])
    scores = StageScores(
        cf=np.array([1.0, 0.2, 0.4, 0.3]),
        retrieval=np.array([0.8, 0.1, 0.6, 0.2]),
        popularity=np.array([3.0, 1.0, 2.0, 0.5]),
        cf_recent=np.array([0.4, 0.1, 0.3, 0.2]),
        content_nearest=content,
        item_item=np.array([0.3, 0.0, 0.2, 0.1]),
        transitions=np.array([2.0, 0.0, 1.0, 0.0]),
    )
    new = scores.as_new(np.array([0, 2]))
    for name in ("cf", "cf_recent", "item_item", "transitions"):
        values = getattr(new, name)
        assert np.isnan(values[[0, 2]]).all() and not np.isnan(values[[1, 3]]).any(), name
    np.testing.assert_array_equal(new.popularity, [0.0, 1.0, 0.0, 0.5])  # nothing counted
    # What the text says stays; the original is not changed.
    np.testing.assert_array_equal(new.retrieval, scores.retrieval)
    np.testing.assert_array_equal(new.content_nearest, content)
    assert not np.isnan(scores.cf).any()
    # Fusion sees them as missing, as it sees a product CF does not know.
    x = features(new)
    column = {name: x[:, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_array_equal(column["cf_missing"], [1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(column["item_item_missing"], column["cf_missing"])
    np.testing.assert_allclose(column["content_nearest"], normalise(content))


def test_context_fusion_picks_by_request_kind(tmp_path: Path) -> None:
    # Searches follow the cross-encoder; recommendations follow CF.
    n = len(FEATURES)
    by_ce = LogisticFusion([1.0 if f == "ce" else 0.0 for f in FEATURES], 0.0)
    by_cf = LogisticFusion([1.0 if f == "cf" else 0.0 for f in FEATURES], 0.0)
    fusion = ContextFusion(query=by_ce, history=by_cf)
    ce, cf = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    assert np.argmax(fusion.fuse(StageScores(cf=cf, ce=ce, has_query=True))) == 0
    assert np.argmax(fusion.fuse(StageScores(cf=cf, ce=ce))) == 1
    path = tmp_path / "fusion.json"
    save_fusion(fusion, path)
    loaded = load_fusion(path)
    assert isinstance(loaded, ContextFusion) and loaded.to_dict() == fusion.to_dict()
    assert len(loaded.to_dict()["query"]["weights"]) == n


def test_place_head_puts_the_reranked_head_above_the_rest_in_first_pass_order() -> None:
    first = np.array([0.9, 5.0, 0.1, 3.0, 0.5])
    rows = np.array([1, 3])  # the first pass's top two
    fused = place_head(first, rows, np.array([-2.0, -1.0]))
    assert list(np.argsort(-fused, kind="stable")) == [3, 1, 0, 4, 2]
    assert fused[3] == -1.0 and fused[1] == -2.0


def test_two_pass_round_trip_and_offline_fuse(tmp_path: Path) -> None:
    by = {
        name: LogisticFusion([1.0 if f == name else 0.0 for f in FEATURES], 0.0)
        for name in ("cf", "ce")
    }
    two = TwoPassFusion(
        by["cf"], by["ce"], rerank_depth=2, cross_encoder_pays=True, fitted_on={"lists": 3}
    )
    path = tmp_path / "fusion.json"
    save_fusion(ContextFusion(query=two, history=two), path)
    loaded = load_fusion(path)
    assert isinstance(loaded, ContextFusion) and loaded.to_dict()["query"] == two.to_dict()
    scores = StageScores(cf=np.array([3.0, 2.0, 1.0]), ce=np.array([0.0, 1.0, 9.0]))
    # Item 2 has the best cross-encoder score but is outside the first pass's top two.
    assert list(np.argsort(-loaded.fuse(scores))) == [1, 0, 2]
    skipped = TwoPassFusion(by["cf"], by["ce"], rerank_depth=2, cross_encoder_pays=False)
    assert list(np.argsort(-skipped.fuse(scores))) == [0, 1, 2]
    path.write_text(json.dumps({**two.to_dict(), "rerank_depth": -1}))
    with pytest.raises(InvalidInput, match="rerank_depth"):
        load_fusion(path)


def test_a_single_fusion_plans_one_pass_over_every_candidate() -> None:
    convex = ConvexFusion()
    single = plan_for(convex, has_query=False)
    assert single.first is convex and single.second is convex
    assert single.rerank_depth == RERANK_ALL and single.cross_encoder_pays
    two = TwoPassFusion(convex, None, 0, False)
    assert plan_for(ContextFusion(query=convex, history=two), has_query=False) is two
