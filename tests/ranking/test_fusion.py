"""Fusion: per-request standardisation, missing scores handled, learned weights, file round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ranking_service.fusion import (
    FUSION_KINDS,
    ConvexFusion,
    LogisticFusion,
    features,
    load_fusion,
    normalise,
    save_fusion,
)
from recsys.errors import InvalidInput


def test_normalise_keeps_nan_and_flattens_constants() -> None:
    z = normalise(np.array([1.0, 2.0, np.nan, 3.0]))
    assert np.isnan(z[2]) and z[0] < z[1] < z[3] and abs(np.nanmean(z)) < 1e-9
    assert (normalise(np.array([5.0, 5.0])) == 0).all()


def test_missing_cf_is_not_a_penalty() -> None:
    fusion = ConvexFusion(alpha=0.5)
    ce = np.array([1.0, 1.0, 0.0])
    cf = np.array([0.0, np.nan, 0.5])  # item 1 is cold: CF cannot score it
    fused = fusion.fuse(ce, cf, None)
    # Same cross-encoder score; the cold item is judged on what exists, not on a made-up 0.
    z_cf = normalise(cf)
    assert fused[1] == pytest.approx(normalise(ce)[1])
    assert fused[0] == pytest.approx(0.5 * normalise(ce)[0] + 0.5 * z_cf[0])


def test_without_cf_retrieval_takes_its_place() -> None:
    fused = ConvexFusion(alpha=0.5).fuse(
        np.array([0.0, 0.0]), np.full(2, np.nan), np.array([0.9, 0.1])
    )
    assert fused[0] > fused[1]


def test_logistic_fusion_learns_which_signal_matters() -> None:
    rng = np.random.default_rng(0)
    x_lists, y_lists = [], []
    for _ in range(50):
        ce, cf, ret = rng.normal(size=(3, 20))
        y = (cf + 0.1 * rng.normal(size=20) > 1.0).astype(float)  # only CF predicts relevance
        x_lists.append(features(ce, cf, ret))
        y_lists.append(y)
    model = LogisticFusion.fit(np.vstack(x_lists), np.concatenate(y_lists))
    weights = dict(zip(["ce", "cf", "retrieval"], model.weights[:3], strict=False))
    assert weights["cf"] > 3 * abs(weights["ce"]) and weights["cf"] > 3 * abs(weights["retrieval"])


def test_save_load_and_unknown_kind(tmp_path: Path) -> None:
    path = tmp_path / "fusion.json"
    model = LogisticFusion(weights=[1.0, 2.0, 0.5, -1.0, 0.0], bias=0.1)
    save_fusion(model, path)
    loaded = load_fusion(path)
    args = (np.array([0.1, 0.9]), np.array([np.nan, 1.0]), np.array([0.3, 0.2]))
    np.testing.assert_allclose(loaded.fuse(*args), model.fuse(*args))
    path.write_text('{"kind": "magic"}')
    with pytest.raises(InvalidInput, match=r"fusion\.json"):
        load_fusion(path)


def test_missing_cf_is_not_ranked_below_an_average_cf_item() -> None:
    ce = np.array([2.0, 2.0, 0.0, -1.0])
    cf = np.array([np.nan, 0.5, 0.9, 0.1])  # item 0 is cold; item 1 has the average CF score
    fused = ConvexFusion().fuse(ce, cf, None)
    assert normalise(cf)[1] == pytest.approx(0.0)
    assert fused[0] >= fused[1]


def test_without_the_cross_encoder_retrieval_stands_in_for_it() -> None:
    cf = np.array([0.2, 0.2, 0.2])  # CF cannot tell them apart
    retrieval = np.array([0.1, 0.9, 0.5])
    fused = ConvexFusion().fuse(None, cf, retrieval)
    assert list(np.argsort(-fused)) == [1, 2, 0]
    # Nothing but retrieval: its order, and without retrieval either, zeros rather than NaN.
    only = ConvexFusion().fuse(None, np.full(3, np.nan), retrieval)
    assert list(np.argsort(-only)) == [1, 2, 0]
    assert (ConvexFusion().fuse(None, np.full(2, np.nan), None) == 0).all()


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
