"""Item-to-item CF: EASE's weights against their closed form, transitions in sequence order,
scores and recall from a history, the files, and the ranker reading it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from ranking_service.cf import CFModel
from ranking_service.fusion import ConvexFusion
from ranking_service.item_item import (
    RECENT,
    TRANSITION_DECAY,
    ItemItem,
    ease_weights,
    refitted,
)
from ranking_service.ranker import Ranker
from recsys.core.domain import Candidate, HistoryItem, RankContext
from recsys.core.errors import InvalidInput, NotFound


def sequences(*users: list[str]) -> pd.DataFrame:
    """One row per item a user had, in the order given (timestamps ascending)."""
    rows = [
        {"user_id": f"u{u}", "item_id": item, "timestamp": t, "weight": 1.0, "query": ""}
        for u, items in enumerate(users)
        for t, item in enumerate(items)
    ]
    return pd.DataFrame(rows)


def test_ease_weights_are_the_closed_form(shop_interactions: pd.DataFrame) -> None:
    users = pd.factorize(shop_interactions["user_id"])[0]
    items, ids = pd.factorize(shop_interactions["item_id"])
    x = sp.csr_matrix((np.ones(len(users), np.float32), (users, items)))
    x.data[:] = 1.0
    lam = 5.0
    gram = (x.T @ x).toarray().astype(np.float64)
    p = np.linalg.inv(gram + lam * np.eye(len(ids)))
    expected = -p / np.diag(p)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(ease_weights(x, lam), expected, atol=1e-4)


def test_training_keeps_each_items_largest_weights(shop_interactions: pd.DataFrame) -> None:
    full = ItemItem.train(shop_interactions, 5.0, neighbours=1000)
    pruned = ItemItem.train(shop_interactions, 5.0, neighbours=3)
    assert full is not None and pruned is not None
    dense = full.weights.toarray()
    kept = pruned.weights.toarray()
    assert (np.diff(pruned.weights.indptr) <= 3).all()
    for row in range(len(dense)):
        top = np.sort(dense[row])[-3:]
        np.testing.assert_allclose(np.sort(kept[row][kept[row] != 0]), top[top != 0], atol=1e-6)


def test_transitions_follow_each_users_order_within_the_window() -> None:
    # a→b→c→d→e: b is next to a (1), c two steps on (decay), e beyond the window (none).
    model = ItemItem.train(sequences(["a", "b", "c", "d", "e"], ["b", "a"]), 10.0)
    assert model is not None
    t = pd.DataFrame(model.transitions.toarray(), index=model.item_ids, columns=model.item_ids)
    assert t.loc["a", "b"] == pytest.approx(2.0)  # a then b, and b then a: symmetric counts
    assert t.loc["a", "c"] == pytest.approx(TRANSITION_DECAY)
    assert t.loc["a", "d"] == pytest.approx(TRANSITION_DECAY**2)
    assert t.loc["a", "e"] == 0.0
    assert np.allclose(t.to_numpy(), t.to_numpy().T)
    # Rows are shuffled: the order comes from the timestamps, not the file.
    shuffled = sequences(["a", "b", "c", "d", "e"], ["b", "a"]).sample(frac=1.0, random_state=1)
    again = ItemItem.train(shuffled, 10.0)
    assert again is not None
    assert (again.transitions != model.transitions).nnz == 0


def test_scores_read_the_whole_history_and_the_recent_transitions() -> None:
    model = ItemItem.train(sequences(["a", "b", "c", "d", "e"], ["b", "a", "f"], ["c", "f"]), 1.0)
    assert model is not None
    history = ["a", "c", "unknown", "f"]  # most recent first
    scores = model.scores(history, ["b", "d", "new"])
    assert scores is not None
    w = pd.DataFrame(model.weights.toarray(), index=model.item_ids, columns=model.item_ids)
    t = pd.DataFrame(model.transitions.toarray(), index=model.item_ids, columns=model.item_ids)
    known = ["a", "c", "f"]
    np.testing.assert_allclose(scores.weights[:2], w.loc[known, ["b", "d"]].sum(), rtol=1e-5)
    recent = sum(
        TRANSITION_DECAY**age * t.loc[item, ["b", "d"]]
        for age, item in enumerate(history[:RECENT])
        if item in t.index
    )
    np.testing.assert_allclose(scores.transitions[:2], recent, rtol=1e-5)
    # An item the model never saw (added online) is unscored, not zero.
    assert np.isnan(scores.weights[2]) and np.isnan(scores.transitions[2])
    assert model.scores(["unknown"], ["a"]) is None


def test_recommend_gives_each_views_list_without_what_the_user_has() -> None:
    data = sequences(["a", "b", "c"], ["a", "b", "d"], ["b", "c"], ["a", "c"], ["e", "f"])
    model = ItemItem.train(data, 1.0)
    assert model is not None
    lists = model.recommend(["a"], 5, exclude={"c"})
    assert len(lists) == 2
    for found in lists:
        ids = [item for item, _ in found]
        assert "a" not in ids and "c" not in ids
        assert all(score > 0 for _, score in found)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
    # b follows a in two sequences: it leads the transitions.
    assert lists[1][0][0] == "b"
    assert model.recommend(["unknown"], 5) == []


def test_the_most_popular_items_are_kept() -> None:
    data = sequences(["a", "b"], ["a", "c"], ["a", "b"], ["d", "e"])
    model = ItemItem.train(data, 1.0, max_items=2)
    assert model is not None
    assert model.item_ids == ["a", "b"]
    assert ItemItem.train(data.iloc[0:0], 1.0) is None
    with pytest.raises(InvalidInput, match="lambda 0"):
        ItemItem.train(data, 0.0)


def test_files_round_trip(shop_interactions: pd.DataFrame, tmp_path: Path) -> None:
    model = ItemItem.train(shop_interactions, 25.0)
    assert model is not None
    assert ItemItem.load(tmp_path) is None  # a bundle without one
    record = model.save(tmp_path)
    assert record["lambda"] == 25.0 and record["items"] == model.n_items
    loaded = ItemItem.load(tmp_path)
    assert loaded is not None
    assert loaded.item_ids == model.item_ids and loaded.lam == 25.0
    assert (loaded.weights != model.weights).nnz == 0
    assert (loaded.transitions != model.transitions).nnz == 0
    again = refitted({"item_item": {"lambda": 25.0}}, shop_interactions)
    assert again is not None and (again.weights != model.weights).nnz == 0
    assert refitted({"item_item": {"skipped": "no weight"}}, shop_interactions) is None


def test_the_ranker_recalls_and_scores_from_the_item_to_item_model(
    shop_interactions: pd.DataFrame,
) -> None:
    cf = CFModel.train(shop_interactions, factors=8, iterations=5)
    item_item = ItemItem.train(shop_interactions, 5.0)
    ranker = Ranker(cf, ConvexFusion(), None, {}, item_item=item_item)
    history = ["D0I1", "D0I2"]
    recall = ranker.recall("", history, 10)
    als = ranker.with_cf(cf, None).recall("", history, 10)
    ids = [item for item, _ in recall.items]
    assert len(ids) == 10 and not set(ids) & set(history)
    assert [s for _, s in recall.items] == sorted((s for _, s in recall.items), reverse=True)
    assert ids != [item for item, _ in als.items]  # the merged lists differ from ALS's
    # CF knows none of the items: nothing to recall from either model.
    with pytest.raises(NotFound):
        ranker.recall("", ["never-seen"], 10)
    context = RankContext(history=tuple(HistoryItem(i, i) for i in history))
    candidates = [Candidate(item_id=i, text=i) for i in ("D0I3", "D1I0", "new-item")]
    stages, _ = ranker.stage_scores(context, candidates)
    assert stages.item_item is not None and stages.transitions is not None
    assert np.isnan(stages.item_item[2]) and not np.isnan(stages.item_item[:2]).any()
    # Same department, same shoppers: D0I3 outscores a product of another department.
    assert stages.item_item[0] > stages.item_item[1]
    plain, _ = ranker.with_cf(cf, None).stage_scores(context, candidates)
    assert plain.item_item is None and plain.transitions is None
