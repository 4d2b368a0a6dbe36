"""NDCG@10, the one implementation fitting, the retrain gate and evaluation score with."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.core.scoring import K, ndcg, ndcg_of


def test_ndcg_of_one_list() -> None:
    assert ndcg(np.array([1.0, 0, 0]), 1) == pytest.approx(1.0)
    assert ndcg(np.array([0.0, 1, 0]), 1) == pytest.approx(1 / np.log2(3))
    assert ndcg(np.array([0.0, 0]), 0) == 0.0


def test_ndcg_counts_only_the_top_k_and_the_ideal_of_at_most_k() -> None:
    labels = [0.0] * K + [1.0]
    assert ndcg(labels, 1) == 0.0
    # 12 relevant items, all in the top 10: a perfect list at 10.
    assert ndcg([1.0] * K, 12) == pytest.approx(1.0)


def test_ndcg_of_ids_agrees_with_labels() -> None:
    ranked = ["a", "b", "c", "d"]
    assert ndcg_of(ranked, {"b", "d", "z"}) == pytest.approx(ndcg([0.0, 1, 0, 1], 3))
    assert ndcg_of([], {"a"}) == 0.0
