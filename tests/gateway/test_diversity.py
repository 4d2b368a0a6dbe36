"""MMR and intra-list diversity on vectors whose answer is known."""

from __future__ import annotations

import numpy as np

from gateway.diversity import intra_list_diversity, mmr


def test_zero_diversity_is_the_relevance_order() -> None:
    rel = np.array([0.2, 0.9, 0.5, 0.7])
    assert mmr(rel, np.eye(4), k=3, diversity=0.0) == [1, 3, 2]


def test_diversity_skips_near_duplicates() -> None:
    vectors = np.array([[1.0, 0.0], [0.99, 0.01], [0.0, 1.0]])
    rel = np.array([1.0, 0.95, 0.5])
    assert mmr(rel, vectors, k=2, diversity=0.0) == [0, 1]
    assert mmr(rel, vectors, k=2, diversity=0.7) == [0, 2]
    assert mmr(rel, vectors, k=3, diversity=1.0) == [0, 2, 1]


def test_relevance_scale_does_not_change_the_picks() -> None:
    vectors = np.array([[1.0, 0.0], [0.9, 0.1], [0.2, 1.0], [0.0, 1.0]])
    rel = np.array([0.9, 0.8, 0.6, 0.1])
    picks = mmr(rel, vectors, k=4, diversity=0.5)
    assert mmr(100 * rel - 7, vectors, k=4, diversity=0.5) == picks


def test_k_larger_than_the_list() -> None:
    assert sorted(mmr(np.array([0.1, 0.2]), np.eye(2), k=5, diversity=0.5)) == [0, 1]
    assert mmr(np.array([0.1, 0.2]), np.eye(2), k=5, diversity=0.0) == [1, 0]
    assert mmr(np.array([]), np.zeros((0, 2)), k=3, diversity=0.5) == []


def test_intra_list_diversity() -> None:
    assert intra_list_diversity(np.eye(3)) == 1.0
    assert abs(intra_list_diversity(np.ones((3, 2)))) < 1e-9
    assert intra_list_diversity(np.ones((1, 2))) == 0.0
