"""ALS on structured data: fold-in matches training, unknown items are NaN, save/load is exact,
binary weighting ignores weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.cf import ALSParams, CFModel
from recsys.core.errors import InvalidInput


@pytest.fixture(scope="module")
def log() -> pd.DataFrame:
    """Two taste groups: users 0-19 like items a*, users 20-39 like items b*."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        group = "a" if u < 20 else "b"
        for i in rng.choice(15, size=8, replace=False):
            rows.append(
                {
                    "user_id": f"u{u}",
                    "item_id": f"{group}{i}",
                    "timestamp": 0,
                    "weight": 1.0,
                    "query": "",
                }
            )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def model(log: pd.DataFrame) -> CFModel:
    return CFModel.train(log, factors=8, iterations=20, regularization=0.05, seed=0)


def test_fold_in_reproduces_a_trained_user(model: CFModel, log: pd.DataFrame) -> None:
    items = log[log.user_id == "u3"].item_id.tolist()
    trained = model.user_vector("u3")
    folded = model.fold_in(items)
    assert trained is not None and folded is not None
    cosine = folded @ trained / (np.linalg.norm(folded) * np.linalg.norm(trained))
    assert cosine > 0.95


def test_folded_in_user_prefers_their_group(model: CFModel) -> None:
    vector = model.fold_in(["a1", "a2", "a3"])
    assert vector is not None
    top = [item for item, _ in model.recommend(vector, 5, exclude={"a1", "a2", "a3"})]
    assert all(item.startswith("a") for item in top)
    assert not {"a1", "a2", "a3"} & set(top)


def test_unknowns(model: CFModel) -> None:
    assert model.user_vector("nobody") is None
    assert model.fold_in(["never-seen"]) is None
    vector = model.user_vector("u0")
    assert vector is not None
    scores = model.scores(vector, ["a1", "cold-item"])
    assert np.isfinite(scores[0]) and np.isnan(scores[1])


def test_save_load_round_trip(model: CFModel, tmp_path: Path) -> None:
    section = model.save(tmp_path)
    assert section["users"] == 40 and section["factors"] == 8
    loaded = CFModel.load(tmp_path)
    vector = model.fold_in(["b1", "b2"])
    assert vector is not None
    np.testing.assert_array_equal(
        loaded.scores(vector, ["b3", "a3"]), model.scores(vector, ["b3", "a3"])
    )
    assert loaded.items_of("u3") == model.items_of("u3") and len(model.items_of("u3")) == 8
    ids = ["a1", "b7", "never-seen"]
    np.testing.assert_array_equal(loaded.popularity(ids), model.popularity(ids))


def test_popularity_counts_distinct_users(log: pd.DataFrame, model: CFModel) -> None:
    users = log.groupby("item_id")["user_id"].nunique()
    popularity = model.popularity(["a1", "b2", "never-seen"])
    assert popularity is not None
    np.testing.assert_allclose(popularity, np.log1p([users["a1"], users["b2"], 0]))
    assert model.items_of("nobody") == []


def test_fold_in_is_implicits_own_user_step(model: CFModel) -> None:
    """fold_in equals implicit's exact (Cholesky) recalculate_user for the same factors."""
    import scipy.sparse as sp
    from implicit.cpu.als import AlternatingLeastSquares

    reference = AlternatingLeastSquares(
        factors=model.factors, regularization=model.regularization, alpha=model.alpha
    )
    reference.item_factors = model.item_factors.copy()
    reference.user_factors = model.user_factors.copy()
    items, weights = ["a1", "a4", "b2"], [1.0, 3.0, 0.5]
    row = sp.csr_matrix(
        (weights, ([0, 0, 0], [model.item_ids.index(i) for i in items])),
        shape=(1, model.n_items),
        dtype=np.float32,
    )
    expected = np.asarray(reference.recalculate_user(0, row)).ravel()
    folded = model.fold_in(items, weights)
    assert folded is not None
    np.testing.assert_allclose(folded, expected, rtol=1e-3, atol=1e-4)


def test_fold_in_ranks_held_out_items_and_leaves_the_model_alone(log: pd.DataFrame) -> None:
    held_out = log.groupby("user_id").tail(2)  # the last two items of every user
    # Two taste groups are a rank-2 structure: more factors on 40 users only fit noise.
    model = CFModel.train(log.drop(held_out.index), factors=2, iterations=20, seed=0)
    before = model.item_factors.copy()
    ranks = []
    for user in log.user_id.unique():
        seen = log[(log.user_id == user) & ~log.index.isin(held_out.index)].item_id.tolist()
        vector = model.fold_in(seen)
        assert vector is not None
        top = [i for i, _ in model.recommend(vector, model.n_items, exclude=set(seen))]
        assert not set(seen) & set(top)
        ranks += [top.index(i) for i in held_out[held_out.user_id == user].item_id]
    # 15 items a group, 6 seen: 9 same-group items compete; random ranks would average ~11.
    assert max(ranks) < 9
    np.testing.assert_array_equal(model.item_factors, before)


def test_bad_fold_in_weights_and_non_positive_weights() -> None:
    frame = pd.DataFrame(
        {"user_id": ["u", "u"], "item_id": ["x", "y"], "timestamp": [0, 1], "weight": [1.0, 0.0]}
    )
    with pytest.raises(InvalidInput, match="> 0"):
        CFModel.train(frame, factors=2, iterations=1)
    frame["weight"] = [1.0, 1.0]
    model = CFModel.train(frame, factors=2, iterations=1)
    with pytest.raises(InvalidInput, match="weights"):
        model.fold_in(["x", "y"], [1.0])


def weighted(log: pd.DataFrame) -> pd.DataFrame:
    """`log` with weights that differ per row, and some rows repeated (their weights sum)."""
    rng = np.random.default_rng(1)
    varied = log.assign(weight=rng.choice([0.5, 1.0, 3.0, 5.0], size=len(log)))
    return pd.concat([varied, varied.iloc[::3]], ignore_index=True)


def test_binary_weighting_ignores_weights(log: pd.DataFrame) -> None:
    """Binary ALS trains on who interacted with what, whatever the weights and repeats; with
    weights, the same log trains another model."""
    params = {"factors": 8, "iterations": 10, "regularization": 0.05, "alpha": 2.0, "seed": 0}
    plain = CFModel.train(log, weighting="binary", **params)
    varied = CFModel.train(weighted(log), weighting="binary", **params)
    np.testing.assert_allclose(plain.item_factors, varied.item_factors, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(plain.user_factors, varied.user_factors, rtol=1e-5, atol=1e-6)
    by_weight = CFModel.train(weighted(log), weighting="weight", **params)
    assert not np.allclose(by_weight.item_factors, plain.item_factors, atol=1e-3)
    # Fold-in too: weights and repeats change nothing (every item counts once, c = alpha).
    once = plain.fold_in(["a1", "a2", "b3"])
    assert once is not None
    for items, weights in ((["a1", "a2", "b3"], [5.0, 0.5, 3.0]), (["a1", "a2", "a1", "b3"], None)):
        again = plain.fold_in(items, weights)
        assert again is not None
        np.testing.assert_allclose(again, once, rtol=1e-6)
    # ... while with weights, they do.
    a = by_weight.fold_in(["a1", "a2", "b3"])
    b = by_weight.fold_in(["a1", "a2", "b3"], [5.0, 0.5, 3.0])
    assert a is not None and b is not None and not np.allclose(a, b, atol=1e-4)


def test_binary_fold_in_reproduces_a_trained_user(log: pd.DataFrame) -> None:
    model = CFModel.train(
        weighted(log), factors=8, iterations=20, regularization=0.05, weighting="binary", seed=0
    )
    trained = model.user_vector("u5")
    folded = model.fold_in(log[log.user_id == "u5"].item_id.tolist())
    assert trained is not None and folded is not None
    assert folded @ trained / (np.linalg.norm(folded) * np.linalg.norm(trained)) > 0.95


def test_weighting_round_trips_and_older_bundles_trained_with_weights(
    log: pd.DataFrame, tmp_path: Path
) -> None:
    binary = CFModel.train(log, factors=4, iterations=2, alpha=10.0, weighting="binary", seed=0)
    section = binary.save(tmp_path / "binary")
    assert section["weighting"] == "binary"
    assert ALSParams.of(section) == ALSParams(4, 2, 0.05, 10.0, "binary") == binary.params
    loaded = CFModel.load(tmp_path / "binary")
    assert loaded.weighting == "binary" and loaded.params == binary.params
    vector = loaded.fold_in(["a1", "a1"], [1.0, 4.0])
    expected = binary.fold_in(["a1"])
    assert vector is not None and expected is not None
    np.testing.assert_allclose(vector, expected, rtol=1e-6)
    # A CF directory from before weighting was recorded: params.json without it.
    old = tmp_path / "old"
    CFModel.train(log, factors=4, iterations=2, seed=0).save(old)
    params = json.loads((old / "params.json").read_text())
    del params["weighting"]
    (old / "params.json").write_text(json.dumps(params))
    assert CFModel.load(old).weighting == "weight"
    assert ALSParams.of(params).weighting == "weight"


def test_unknown_weighting_is_refused(log: pd.DataFrame) -> None:
    with pytest.raises(InvalidInput, match="weighting 'counts'"):
        CFModel.train(log, factors=2, iterations=1, weighting="counts")  # type: ignore[arg-type]
