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

from ranking_service import plan
from ranking_service.features import StageScores, features
from ranking_service.fusion import Fusion, LogisticFusion, TwoPassFusion
from ranking_service.plan import FirstPass, head, order
from recsys.core.scoring import ndcg

log = logging.getLogger(__name__)

PairScorer = Callable[[Sequence[tuple[str, str]]], np.ndarray]

DEPTHS = (10, 20, 30, 50)  # rerank depths the sweep tries
# Held-out lists with a relevant candidate needed to fit instead of falling back: few lists
# already fit a first pass far better than the convex fallback (docs/architecture.md, "Why
# these thresholds").
MIN_LISTS = 10
# Relative NDCG@10 gain over the first pass the cross-encoder must bring to be used at all...
MIN_GAIN = 0.01
# ... and its lead over the first pass, in standard errors of the per-list differences (one
# sided, ~95%): a small gain inside the noise of the held-out lists is not a gain.
GAIN_Z = 1.64
# The chosen depth is the smallest whose NDCG@10 is within this share of the sweep's best.
DEPTH_TOLERANCE = 0.01
# At most how many times faster than the fine-tuned model the cheapest copy the build can make
# (the student's int8 copy) scores pairs: depths that copy could not score within the rerank
# budget even this fast are not swept (docs/architecture.md, "Fine-tuning's time budget").
COPY_SPEEDUP = 8.0
# Components the build keeps only where cross-fitted validation says they pay, and the key of
# their verdict in fusion.json's `fitted_on`.
GATED = {"content": "content_similarity", "item_item": "item_to_item"}


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
    return features(scores, zeroed=("cross_encoder",))


def fit_logistic(xs: Sequence[np.ndarray], ys: Sequence[np.ndarray], **meta: Any) -> LogisticFusion:
    y = np.concatenate(ys).astype(np.float64)
    return LogisticFusion.fit(np.vstack(xs), y, lists=len(xs), positives=int(y.sum()), **meta)


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
    budget_ms: float | None = None,
    **meta: Any,
) -> TwoPassFusion:
    """The two passes for one kind of request (their `fitted_on` records the sweep): the first
    fitted on every list, the depth sweep and second pass on `sweep_sample(lists, sweep_lists)`
    (the cross-encoder's time is the cost); `fallback` for both passes when too few lists
    have a relevant candidate.

    `first_lists` (default `lists`) fit the first pass: it never reads the cross-encoder, so
    it may also learn from requests the cross-encoder was fine-tuned on, which the second
    pass must not. With `budget_ms`, depths that no copy could rerank within it
    (`servable_depths`) are not swept."""
    lists = [f for f in lists if f.labels.any()]
    record: dict[str, Any] = {"requests": requests, "lists": len(lists), **meta}
    if first_lists is not None:
        first_lists = [f for f in first_lists if f.labels.any()]
        record["first_pass_lists"] = len(first_lists)
    fitted_on = lists if first_lists is None else first_lists
    for group, key in GATED.items():
        if len(fitted_on) >= MIN_LISTS and any(f.scores.has(group) for f in fitted_on):
            record[key] = verdict = group_verdict(fitted_on, group)
            if not verdict["pays"]:
                # Both passes then learn without it (its weights are 0, so serving ignores it).
                lists, fitted_on = _without(lists, group), _without(fitted_on, group)
            log.info("fusion for %s: %s %s", requests, key, verdict)
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
    first_ndcg = _mean_ndcg(fitted_on, [order(s) for s in firsts])
    record["first_pass_ndcg@10"] = round(first_ndcg, 4)
    sample = sweep_sample(lists, sweep_lists)
    if score_pairs is None or len(sample) < MIN_LISTS:
        log.info("fusion for %s: first pass only, validation NDCG@10 %.4f", requests, first_ndcg)
        return TwoPassFusion(first, None, 0, False, record)
    firsts = [first.fuse(f.scores) for f in sample]
    per_list = _ndcgs(sample, [order(s) for s in firsts])
    first_ndcg = float(per_list.mean())
    # The smallest depth's pairs first: their speed says how deep the sweep need go.
    shallow = min(depths)
    top, pairs_per_s = _score_heads(sample, [head(s, shallow) for s in firsts], score_pairs)
    if budget_ms is not None:
        servable = servable_depths(depths, pairs_per_s, budget_ms)
        if len(servable) < len(depths):
            record["not_swept"] = {
                "depths": sorted(set(depths) - set(servable)),
                "why": f"beyond {budget_ms:g} ms even at {COPY_SPEEDUP:g}x "
                f"{pairs_per_s:.0f} pairs/s",
            }
        depths = servable
    rest, _ = _score_heads(sample, [head(s, max(depths))[shallow:] for s in firsts], score_pairs)
    ce = [np.concatenate([a, b]) for a, b in zip(top, rest, strict=True)]
    sweep = [
        _depth_row(first, sample, firsts, ce, depth, pairs_per_s, per_list)
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


def servable_depths(depths: Sequence[int], pairs_per_s: float, budget_ms: float) -> list[int]:
    """The `depths` (the smallest always) that a copy COPY_SPEEDUP times faster than
    `pairs_per_s` could score within `budget_ms`."""
    fastest = pairs_per_s * COPY_SPEEDUP
    smallest = min(depths)
    return sorted(d for d in depths if d == smallest or 1000 * d / fastest <= budget_ms)


def group_verdict(lists: Sequence[FusionList], group: str) -> dict[str, Any]:
    """Cross-fitted NDCG@10 (fitted on one half of `lists`, scored on the other) of the first
    pass with and without the features of the component `group`, and whether they pay: as the
    cross-encoder must, by MIN_GAIN and GAIN_Z standard errors."""
    plain = _without(lists, group)
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
            orders = [order(first.fuse(variant[i].scores)) for i in held]
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


def _without(lists: Sequence[FusionList], group: str) -> list[FusionList]:
    return [replace(f, scores=f.scores.without(group)) for f in lists]


def two_pass_ndcg(
    two_pass: TwoPassFusion, lists: Sequence[FusionList], score_pairs: PairScorer
) -> tuple[float, float]:
    """(NDCG@10 of `two_pass` on `lists` with this copy of the cross-encoder reranking at the
    fitted depth, pairs/s of the copy): how copies of one cross-encoder compare."""
    assert two_pass.second is not None
    reranking = replace(two_pass, cross_encoder_pays=True)
    lists = [f for f in lists if f.labels.any()]
    firsts = [plan.first_pass(reranking, f.scores, can_rerank=True) for f in lists]
    ce, pairs_per_s = _score_heads(lists, [first.rows for first in firsts], score_pairs)
    orders = [
        order(plan.final(reranking, f.scores, first, scores))
        for f, first, scores in zip(lists, firsts, ce, strict=True)
    ]
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
    flat = score_pairs(pairs) if pairs else np.zeros(0, np.float32)
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
            xs.append(features(plan.head_stages(f.scores, rows, scores[: len(rows)])))
            ys.append(labels)
    return xs, ys


def _depth_row(
    first_fusion: Fusion,
    lists: Sequence[FusionList],
    firsts: Sequence[np.ndarray],
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
        candidate = TwoPassFusion(first_fusion, fit_logistic(xs, ys), depth, True)
        for i in (i for i in range(len(lists)) if folds[i] == fold):
            first = FirstPass(firsts[i], head(firsts[i], depth))
            orders[i] = order(plan.final(candidate, lists[i].scores, first, ce[i][:depth]))
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
