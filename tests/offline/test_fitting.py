"""The build's fusion lists with products treated as added after the build."""

from __future__ import annotations

import numpy as np

from ranking_service.features import StageScores
from ranking_service.fusion_fit import FusionList
from recsys.core.domain import Candidate
from recsys.offline.fitting import NEW_ITEM_SHARE, as_new, simulated_new


def test_simulated_new_products_are_a_seeded_share() -> None:
    ids = [f"p{i}" for i in range(200)]
    chosen = simulated_new(ids, seed=3)
    assert len(chosen) == round(200 * NEW_ITEM_SHARE) and chosen <= set(ids)
    assert simulated_new(list(reversed(ids)), seed=3) == chosen  # the order given is irrelevant
    assert simulated_new(ids, seed=4) != chosen


def test_a_new_product_only_retrieval_found_stays_and_loses_its_collaborative_scores() -> None:
    candidates = [
        Candidate("old", "an old product", 0.9),
        Candidate("new-retrieved", "a new product", 0.7),
        Candidate("new-from-cf", "a new product CF proposed", None),
        Candidate("old-from-cf", "an old product CF proposed", None),
    ]
    scores = StageScores(
        cf=np.array([0.5, 0.4, 0.3, 0.2]),
        retrieval=np.array([0.9, 0.7, np.nan, np.nan]),
        content_nearest=np.array([0.1, 0.8, 0.2, 0.3]),
    )
    texts = tuple(c.text for c in candidates)
    fusion = FusionList(scores, np.array([0.0, 1.0, 1.0, 0.0]), "history", texts)
    new = as_new(fusion, candidates, {"new-retrieved", "new-from-cf"})
    # CF could not have proposed a product it never saw: that candidate is gone.
    assert new.texts == (texts[0], texts[1], texts[3])
    np.testing.assert_array_equal(new.labels, [0.0, 1.0, 0.0])
    assert np.isnan(new.scores.cf[1]) and not np.isnan(new.scores.cf[[0, 2]]).any()
    np.testing.assert_array_equal(new.scores.content_nearest, [0.1, 0.8, 0.3])
    assert new.context == "history"
