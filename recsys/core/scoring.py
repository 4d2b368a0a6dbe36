"""NDCG of ranked lists, the one implementation the build's fusion fitting, the retrain gate and
evaluation score with (binary relevance; evaluation's report table also reads ranx, which agrees)."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

K = 10  # every figure the system fits, gates or reports on is at 10
# Reciprocal rank fusion's constant (Cormack et al. 2009): a list's rank r adds 1 / (RRF_K + r).
RRF_K = 60


def ndcg(labels_in_order: Sequence[float] | np.ndarray, relevant: int, k: int = K) -> float:
    """NDCG@k of one ranked list of binary labels, out of `relevant` relevant items (0: 0)."""
    if relevant == 0:
        return 0.0
    gains = np.asarray(labels_in_order[:k], np.float64)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    return float(gains @ discounts[: len(gains)] / discounts[: min(relevant, k)].sum())


def ndcg_of(ranked: Sequence[str], relevant: Collection[str], k: int = K) -> float:
    """NDCG@k of ranked item ids against the set of relevant ones."""
    labels = [1.0 if item in relevant else 0.0 for item in list(ranked)[:k]]
    return ndcg(labels, len(relevant), k)


def reciprocal_rank_fusion(
    lists: Sequence[Sequence[str]], k: int = RRF_K
) -> list[tuple[str, float]]:
    """The union of ranked lists, best first by summed 1 / (k + rank) (rank from 1); ties in
    order of first appearance."""
    fused: dict[str, float] = {}
    for ranked in lists:
        for rank, item in enumerate(ranked, start=1):
            fused[item] = fused.get(item, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda pair: -pair[1])
