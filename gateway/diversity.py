"""Maximal marginal relevance over item vectors, and the intra-list diversity it trades for."""

from __future__ import annotations

import numpy as np


def mmr(relevance: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> list[int]:
    """Indices of k items chosen greedily by (1 − λ)·relevance − λ·max cosine to those chosen.

    Relevance is min-max scaled so λ = `diversity` means the same whatever the score's scale;
    diversity 0 returns exactly the relevance order.
    """
    n = len(relevance)
    k = min(k, n)
    order = list(np.argsort(-relevance, kind="stable"))
    if diversity <= 0 or k <= 1:
        return [int(i) for i in order[:k]]
    span = float(relevance.max() - relevance.min())
    rel = (relevance - relevance.min()) / span if span > 0 else np.zeros(n)
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    chosen = [int(order[0])]
    max_sim = unit @ unit[chosen[0]]
    remaining = np.ones(n, dtype=bool)
    remaining[chosen[0]] = False
    while len(chosen) < k:
        score = (1 - diversity) * rel - diversity * max_sim
        score[~remaining] = -np.inf
        pick = int(np.argmax(score))
        chosen.append(pick)
        remaining[pick] = False
        max_sim = np.maximum(max_sim, unit @ unit[pick])
    return chosen


def intra_list_diversity(vectors: np.ndarray) -> float:
    """1 − mean pairwise cosine similarity of a list's item vectors (0 for fewer than two)."""
    if len(vectors) < 2:
        return 0.0
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    sims = unit @ unit.T
    n = len(vectors)
    mean = (sims.sum() - np.trace(sims)) / (n * (n - 1))
    return float(1.0 - mean)
