"""Ranking metrics at 10 through ranx (a maintained library), plus coverage and intra-list diversity."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from recsys.core.scoring import K, ndcg_of

ACCURACY_METRICS = (f"ndcg@{K}", f"recall@{K}", f"mrr@{K}")
BOOTSTRAP_DRAWS = 1000  # paired bootstrap resamples of users (recommend) and queries (search)


def accuracy(
    relevant: Mapping[str, set[str]], answers: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """Mean NDCG, Recall and MRR at 10 over every query in `relevant` (a missing answer scores 0)."""
    from ranx import Qrels, Run, evaluate  # numba-compiled; imported only when evaluating

    qrels = Qrels({q: dict.fromkeys(items, 1) for q, items in relevant.items()})
    run_dict: dict[str, dict[str, float]] = {}
    for query in relevant:
        ranked = list(answers.get(query, ()))[:K]
        # ranx ranks by score: give strictly decreasing scores in answer order.
        scores = {item: float(K - i) for i, item in enumerate(ranked)}
        # ranx refuses empty rankings; an unmatched placeholder scores 0, like no answer.
        run_dict[query] = scores or {"\0no-answer": 0.0}
    means = evaluate(qrels, Run(run_dict), list(ACCURACY_METRICS), make_comparable=True)
    return {name: float(means[name]) for name in ACCURACY_METRICS}


def coverage(answers: Mapping[str, Sequence[str]], catalog_size: int) -> float:
    """Share of the catalog that appears in at least one top-10 answer."""
    shown = {item for ranked in answers.values() for item in list(ranked)[:K]}
    return len(shown) / catalog_size if catalog_size else 0.0


def mean_intra_list_diversity(
    answers: Mapping[str, Sequence[str]], vector_of: Callable[[str], np.ndarray | None]
) -> float:
    """Mean over answers of 1 − mean pairwise cosine of the top-10 items' vectors."""
    from gateway.diversity import intra_list_diversity

    values = []
    for ranked in answers.values():
        vectors = [v for v in (vector_of(i) for i in list(ranked)[:K]) if v is not None]
        if len(vectors) >= 2:
            values.append(intra_list_diversity(np.stack(vectors)))
    return float(np.mean(values)) if values else 0.0


def per_query_ndcg(
    relevant: Mapping[str, set[str]], answers: Mapping[str, Sequence[str]]
) -> np.ndarray:
    """Binary-relevance NDCG at 10 per query, in `relevant`'s order (its mean is `accuracy`'s)."""
    return np.array([ndcg_of(answers.get(query, ()), items) for query, items in relevant.items()])


def paired_bootstrap_ratio(
    numerator: np.ndarray, denominator: np.ndarray, draws: int = 1000, seed: int = 0
) -> dict[str, float]:
    """mean(numerator) / mean(denominator) over the same queries, with its 95% percentile
    interval from resampling queries with replacement (both sides get the same resample)."""
    a, b = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired bootstrap: shapes {a.shape} and {b.shape} must be equal, 1-D")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(draws, len(a)))
    num, den = a[picks].mean(axis=1), b[picks].mean(axis=1)
    ratios = np.divide(num, den, out=np.full(draws, np.inf), where=den > 0)
    # Order statistics, not interpolation: a resample whose denominator is 0 is an infinite
    # ratio, which interpolation would turn into NaN.
    low = np.percentile(ratios, 2.5, method="lower")
    high = np.percentile(ratios, 97.5, method="higher")
    point = a.mean() / b.mean() if b.mean() > 0 else float("inf")
    return {"ratio": float(point), "low": float(low), "high": float(high), "draws": draws}


def bootstrap(
    relevant: dict[str, set[str]],
    runs: dict[str, dict[str, list[str]]],
    sampled: Mapping[str, Collection[str]] | None = None,
) -> dict[str, Any]:
    """`full`'s NDCG@10 over each other method's, and over the best other (chosen on the point
    estimates of the methods that answered every query), with 95% paired bootstrap intervals
    over the same users or queries: for a method in `sampled`, over the queries it answered."""
    ndcg = {name: per_query_ndcg(relevant, run) for name, run in runs.items()}
    sampled = sampled or {}

    def paired(name: str) -> dict[str, float]:
        full, other = ndcg["full"], ndcg[name]
        if name in sampled:
            answered = np.array([query in sampled[name] for query in relevant], dtype=bool)
            full, other = full[answered], other[answered]
        return paired_bootstrap_ratio(full, other, BOOTSTRAP_DRAWS)

    others = [name for name in ndcg if name != "full"]
    best = max((name for name in others if name not in sampled), key=lambda n: ndcg[n].mean())
    return {
        "best_other": best,
        "full / best other": paired(best),
        "full / each": {name: paired(name) for name in others},
    }
