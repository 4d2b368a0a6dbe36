"""ALS on structured data: fold-in matches training, unknown items are NaN, save/load is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.cf import CFModel


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
