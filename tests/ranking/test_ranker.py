"""Ranker over the sample bundle: CF recall for known, folded-in and unknown users."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ranking_service.ranker import Ranker
from recsys.bundle import Bundle
from recsys.errors import NotFound
from recsys.sample import sample_paths
from recsys.settings import Settings


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
    recall = ranker.recall(user, items[:2], 10, exclude=frozenset(items[2:4]))
    ids = [i for i, _ in recall.items]
    assert len(ids) == 10 and not recall.cf_folded_in
    # Neither the request's history and exclusions nor what the user had at training.
    assert not set(ids) & set(items)
    assert set(ranker.cf.items_of(user)) == set(items)
    scores = [s for _, s in recall.items]
    assert scores == sorted(scores, reverse=True)
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
