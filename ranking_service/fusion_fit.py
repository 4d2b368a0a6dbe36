"""Fits the two passes on held-out requests: the first fusion over whole pools, a sweep of
rerank depths, whether the cross-encoder pays for this kind of request, and the second fusion.

Depths and the decision to use the cross-encoder are judged by NDCG@10 of the second pass
cross-fitted over two halves of the lists (fitted on one, scored on the other), against the
first pass alone: the cross-encoder must earn its time on lists it was not fitted on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ranking_service.fusion import (
    FEATURES,
    Fusion,
    LogisticFusion,
    StageScores,
    TwoPassFusion,
    features,
    head,
    place_head,
    subset,
)

log = logging.getLogger(__name__)

PairScorer = Callable[[Sequence[tuple[str, str]]], np.ndarray]

DEPTHS = (10, 20, 30, 50)  # rerank depths the sweep tries
# Held-out lists with a relevant candidate needed to fit instead of falling back. Measured on
# MovieLens searches: 13 held-out queries fitted a first pass (popularity, retrieval) that reached
# test NDCG@10 0.083, where the convex fallback reached 0.045.
MIN_LISTS = 10
# Relative NDCG@10 gain over the first pass the cross-encoder must bring to be used at all...
MIN_GAIN = 0.01
# ... and its lead over the first pass, in standard errors of the per-list differences (one
# sided, ~95%). On MovieLens a +2% gain over 160 lists (t < 1) chose the cross-encoder for
# recommendations, and test NDCG@10 fell from 0.0813 to 0.0766.
GAIN_Z = 1.64
# The chosen depth is the smallest whose NDCG@10 is within this share of the sweep's best.
DEPTH_TOLERANCE = 0.01
K = 10
_CE_COLUMNS = [FEATURES.index("ce"), FEATURES.index("ce_missing")]


@dataclass(frozen=True)
class FusionList:
    """One held-out request: stage scores without the cross-encoder, which candidates were
    relevant, and the texts the cross-encoder would read (empty context: it cannot score)."""

    scores: StageScores
    labels: np.ndarray
    context: str = ""
    texts: tuple[str, ...] = ()


def first_pass_features(scores: StageScores) -> np.ndarray:
    """`features` with the cross-encoder's columns zeroed: the first pass never sees it."""
    x = features(replace(scores, ce=None))
    x[:, _CE_COLUMNS] = 0.0
    return x


def fit_logistic(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], **meta: Any) -> LogisticFusion:
    y = np.concatenate(ys).astype(np.float64)
    return LogisticFusion.fit(np.vstack(xs), y, lists=len(xs), positives=int(y.sum()), **meta)


def ndcg(labels_in_order: np.ndarray, relevant: int, k: int = K) -> float:
    """NDCG@k of one ranked list of binary labels, out of `relevant` relevant items."""
    if relevant == 0:
        return 0.0
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    gains = np.asarray(labels_in_order[:k], np.float64)
    return float(gains @ discounts[: len(gains)] / discounts[: min(relevant, k)].sum())


def sweep_sample(lists: Sequence[FusionList], sweep_lists: int | None) -> list[FusionList]:
    """The lists the cross-encoder scores: the first `sweep_lists` (all when None) with a
    relevant candidate and a context it can read."""
    scorable = [f for f in lists if f.labels.any() and f.context]
    return scorable if sweep_lists is None else scorable[:sweep_lists]


def fit_two_pass(
    lists: Sequence[FusionList],
    score_pairs: PairScorer | None,
    fallback: Fusion,
    requests: str,
    depths: Sequence[int] = DEPTHS,
    sweep_lists: int | None = None,
    first_lists: Sequence[FusionList] | None = None,
    **meta: Any,
) -> TwoPassFusion:
    """The two passes for one kind of request (their `fitted_on` records the sweep): the first
    fitted on every list, the depth sweep and second pass on `sweep_sample(lists, sweep_lists)`
    (the cross-encoder's time is the cost); `fallback` for both passes when too few lists
    have a relevant candidate.

    `first_lists` (default `lists`) fit the first pass: it never reads the cross-encoder, so
    it may also learn from requests the cross-encoder was fine-tuned on, which the second
    pass must not."""
    lists = [f for f in lists if f.labels.any()]
    record: dict[str, Any] = {"requests": requests, "lists": len(lists), **meta}
    if first_lists is not None:
        first_lists = [f for f in first_lists if f.labels.any()]
        record["first_pass_lists"] = len(first_lists)
    fitted_on = lists if first_lists is None else first_lists
    if len(fitted_on) >= MIN_LISTS and _has_content(fitted_on):
        record["content_similarity"] = verdict = content_verdict(fitted_on)
        if not verdict["pays"]:
            # Both passes then learn without it (its weights are 0, so serving ignores it).
            lists, fitted_on = _without_content(lists), _without_content(fitted_on)
        log.info("fusion for %s: content similarity %s", requests, verdict)
    if len(fitted_on) < MIN_LISTS:
        reason = f"only {len(fitted_on)} {requests} with a relevant candidate (need {MIN_LISTS})"
        log.warning("fusion for %s: %s; keeping %s", requests, reason, fallback.to_dict())
        second = fallback if score_pairs is not None else None
        return TwoPassFusion(
            first=fallback,
            second=second,
            rerank_depth=max(depths),
            cross_encoder_pays=second is not None,
            fitted_on={**record, "fallback": reason},
        )
    first = fit_logistic(
        [first_pass_features(f.scores) for f in fitted_on], [f.labels for f in fitted_on]
    )
    firsts = [first.fuse(f.scores) for f in fitted_on]
    first_ndcg = _mean_ndcg(fitted_on, [np.argsort(-s, kind="stable") for s in firsts])
    record["first_pass_ndcg@10"] = round(first_ndcg, 4)
    sample = sweep_sample(lists, sweep_lists)
    if score_pairs is None or len(sample) < MIN_LISTS:
        log.info("fusion for %s: first pass only, validation NDCG@10 %.4f", requests, first_ndcg)
        return TwoPassFusion(first, None, 0, False, record)
    firsts = [first.fuse(f.scores) for f in sample]
    per_list = _ndcgs(sample, [np.argsort(-s, kind="stable") for s in firsts])
    first_ndcg = float(per_list.mean())
    heads = [head(s, max(depths)) for s in firsts]
    ce, pairs_per_s = _score_heads(sample, heads, score_pairs)
    sweep = [
        _depth_row(sample, firsts, heads, ce, depth, pairs_per_s, per_list)
        for depth in sorted(depths)
    ]
    depth, pays = choose_depth(sweep, first_ndcg)
    second = fit_logistic(*_head_lists(sample, firsts, ce, depth))
    record |= {
        "sweep_lists": len(sample),
        "sweep_first_pass_ndcg@10": round(first_ndcg, 4),
        "sweep": sweep,
        "cross_encoder_pairs_per_s": round(pairs_per_s, 1),
    }
    log.info(
        "fusion for %s: first pass NDCG@10 %.4f; rerank depth sweep %s -> depth %d, "
        "cross-encoder %s",
        requests,
        first_ndcg,
        ", ".join(
            f"{r['depth']}: {r['ndcg@10']:.4f} (gain s.e. {r['gain_se']:.4f}, "
            f"{r['ms_per_request']:.0f} ms)"
            for r in sweep
        ),
        depth,
        "used" if pays else f"skipped (no gain of {MIN_GAIN:.0%} and {GAIN_Z} standard errors)",
    )
    return TwoPassFusion(first, second, depth, pays, record)


def content_verdict(lists: Sequence[FusionList]) -> dict[str, Any]:
    """Cross-fitted NDCG@10 (fitted on one half of `lists`, scored on the other) of the first
    pass with and without the content-similarity features, and whether they pay: as the
    cross-encoder must, by MIN_GAIN and GAIN_Z standard errors."""
    plain = _without_content(lists)
    folds = np.arange(len(lists)) % 2
    scored = {"with": np.zeros(len(lists)), "without": np.zeros(len(lists))}
    for fold in (0, 1):
        train = [i for i in range(len(lists)) if folds[i] != fold]
        held = [i for i in range(len(lists)) if folds[i] == fold]
        for name, variant in (("with", lists), ("without", plain)):
            first = fit_logistic(
                [first_pass_features(variant[i].scores) for i in train],
                [variant[i].labels for i in train],
            )
            orders = [np.argsort(-first.fuse(variant[i].scores), kind="stable") for i in held]
            scored[name][held] = _ndcgs([variant[i] for i in held], orders)
    gains = scored["with"] - scored["without"]
    with_, without = float(scored["with"].mean()), float(scored["without"].mean())
    gain_se = float(gains.std(ddof=1) / np.sqrt(len(gains))) if len(gains) > 1 else 0.0
    return {
        "ndcg@10 with": round(with_, 4),
        "ndcg@10 without": round(without, 4),
        "gain_se": round(gain_se, 4),
        "pays": with_ >= without * (1 + MIN_GAIN) and with_ - without >= GAIN_Z * gain_se,
    }


def _has_content(lists: Sequence[FusionList]) -> bool:
    return any(f.scores.content_nearest is not None for f in lists)


def _without_content(lists: Sequence[FusionList]) -> list[FusionList]:
    return [
        replace(f, scores=replace(f.scores, content_nearest=None, content_recent=None))
        for f in lists
    ]


def two_pass_ndcg(
    two_pass: TwoPassFusion, lists: Sequence[FusionList], score_pairs: PairScorer
) -> tuple[float, float]:
    """(NDCG@10 of `two_pass` on `lists` with this copy of the cross-encoder reranking at the
    fitted depth, pairs/s of the copy): how copies of one cross-encoder compare."""
    assert two_pass.second is not None
    lists = [f for f in lists if f.labels.any()]
    firsts = [two_pass.first.fuse(f.scores) for f in lists]
    heads = [head(s, two_pass.rerank_depth) for s in firsts]
    ce, pairs_per_s = _score_heads(lists, heads, score_pairs)
    orders = []
    for f, first, rows, scores in zip(lists, firsts, heads, ce, strict=True):
        second = two_pass.second.fuse(_head_scores(f, rows, scores))
        orders.append(np.argsort(-place_head(first, rows, second), kind="stable"))
    return _mean_ndcg(lists, orders), pairs_per_s


def within_budget(
    two_pass: TwoPassFusion,
    lists: Sequence[FusionList],
    score_pairs: PairScorer,
    pairs_per_s: float,
    budget_ms: float,
) -> TwoPassFusion:
    """`two_pass` with its rerank depth cut to what the serving copy scores, at `pairs_per_s`,
    within `budget_ms` per request: the sweep's choice among the depths that fit, the second
    pass refitted on `lists` (the sweep's sample) there; the cross-encoder is skipped where no
    depth that fits pays."""
    if two_pass.second is None or not two_pass.cross_encoder_pays:
        return two_pass

    def ms(depth: int) -> float:
        return round(1000 * depth / max(pairs_per_s, 1e-9), 1)

    record = {**two_pass.fitted_on, "rerank_budget_ms": budget_ms}
    if ms(two_pass.rerank_depth) <= budget_ms:
        return replace(two_pass, fitted_on={**record, "ms_per_request": ms(two_pass.rerank_depth)})
    sweep = two_pass.fitted_on.get("sweep")
    if not sweep:  # the convex fallback: no sweep to choose from, only the depth to cut
        depth = max(1, int(budget_ms * pairs_per_s / 1000))
        return replace(
            two_pass, rerank_depth=depth, fitted_on={**record, "ms_per_request": ms(depth)}
        )
    fits = [row for row in sweep if ms(row["depth"]) <= budget_ms]
    depth, pays = (
        choose_depth(fits, two_pass.fitted_on["sweep_first_pass_ndcg@10"]) if fits else (0, False)
    )
    if not pays:
        log.info(
            "fusion for %s: no rerank depth that pays fits %.0f ms at %.0f pairs/s; "
            "cross-encoder skipped",
            two_pass.fitted_on.get("requests"),
            budget_ms,
            pairs_per_s,
        )
        return replace(
            two_pass, cross_encoder_pays=False, fitted_on={**record, "over_budget": True}
        )
    firsts = [two_pass.first.fuse(f.scores) for f in lists]
    ce, _ = _score_heads(lists, [head(s, depth) for s in firsts], score_pairs)
    second = fit_logistic(*_head_lists(lists, firsts, ce, depth))
    log.info(
        "fusion for %s: rerank depth %d -> %d to fit %.0f ms at %.0f pairs/s",
        two_pass.fitted_on.get("requests"),
        two_pass.rerank_depth,
        depth,
        budget_ms,
        pairs_per_s,
    )
    return TwoPassFusion(
        two_pass.first, second, depth, True, {**record, "ms_per_request": ms(depth)}
    )


def choose_depth(sweep: Sequence[dict[str, Any]], first_ndcg: float) -> tuple[int, bool]:
    """(depth, whether the cross-encoder pays): the smallest depth within DEPTH_TOLERANCE of the
    sweep's best among those that beat the first pass by MIN_GAIN and by GAIN_Z standard errors
    (`gain_se`); the best depth if none does."""
    best = max(sweep, key=lambda row: row["ndcg@10"])
    paying = [
        row
        for row in sweep
        if row["ndcg@10"] >= first_ndcg * (1 + MIN_GAIN)
        and row["ndcg@10"] - first_ndcg >= GAIN_Z * row.get("gain_se", 0.0)
    ]
    if not paying:
        return int(best["depth"]), False
    floor = best["ndcg@10"] * (1 - DEPTH_TOLERANCE)
    return int(min(row["depth"] for row in paying if row["ndcg@10"] >= floor)), True


def _score_heads(
    lists: Sequence[FusionList], heads: Sequence[np.ndarray], score_pairs: PairScorer
) -> tuple[list[np.ndarray], float]:
    """Cross-encoder scores of every list's head in one call, and the pairs/s it ran at."""
    pairs = [(f.context, f.texts[i]) for f, rows in zip(lists, heads, strict=True) for i in rows]
    started = time.perf_counter()
    flat = score_pairs(pairs)
    pairs_per_s = len(pairs) / max(time.perf_counter() - started, 1e-9)
    out, offset = [], 0
    for rows in heads:
        out.append(np.asarray(flat[offset : offset + len(rows)], np.float32))
        offset += len(rows)
    return out, pairs_per_s


def _head_lists(
    lists: Sequence[FusionList],
    firsts: Sequence[np.ndarray],
    ce: Sequence[np.ndarray],
    depth: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Second-pass training rows: each list's top `depth` with cross-encoder scores."""
    xs, ys = [], []
    for f, first, scores in zip(lists, firsts, ce, strict=True):
        rows = head(first, depth)
        labels = f.labels[rows]
        if labels.any():
            xs.append(features(_head_scores(f, rows, scores[: len(rows)])))
            ys.append(labels)
    return xs, ys


def _head_scores(f: FusionList, rows: np.ndarray, ce: np.ndarray) -> StageScores:
    return replace(subset(f.scores, rows), ce=ce)


def _depth_row(
    lists: Sequence[FusionList],
    firsts: Sequence[np.ndarray],
    heads: Sequence[np.ndarray],
    ce: Sequence[np.ndarray],
    depth: int,
    pairs_per_s: float,
    first_ndcgs: np.ndarray,
) -> dict[str, Any]:
    """Cross-fitted NDCG@10 of reranking the top `depth`, the standard error of its per-list
    gain over the first pass (`first_ndcgs`), and its cross-encoder time."""
    folds = np.arange(len(lists)) % 2
    orders: list[np.ndarray] = [np.zeros(0, int)] * len(lists)
    for fold in (0, 1):
        train = [i for i in range(len(lists)) if folds[i] != fold]
        xs, ys = _head_lists(
            [lists[i] for i in train], [firsts[i] for i in train], [ce[i] for i in train], depth
        )
        second = fit_logistic(xs, ys)
        for i in (i for i in range(len(lists)) if folds[i] == fold):
            rows = heads[i][:depth]
            fused = place_head(
                firsts[i], rows, second.fuse(_head_scores(lists[i], rows, ce[i][:depth]))
            )
            orders[i] = np.argsort(-fused, kind="stable")
    values = _ndcgs(lists, orders)
    gains = values - first_ndcgs
    return {
        "depth": depth,
        "ndcg@10": round(float(values.mean()), 4),
        "gain_se": round(float(gains.std(ddof=1) / np.sqrt(len(gains))), 4),
        "ms_per_request": round(1000 * depth / max(pairs_per_s, 1e-9), 1),
    }


def _ndcgs(lists: Sequence[FusionList], orders: Sequence[np.ndarray]) -> np.ndarray:
    """NDCG@10 of each list in the given order."""
    return np.array(
        [ndcg(f.labels[o], int(f.labels.sum())) for f, o in zip(lists, orders, strict=True)]
    )


def _mean_ndcg(lists: Sequence[FusionList], orders: Sequence[np.ndarray]) -> float:
    return float(_ndcgs(lists, orders).mean())
