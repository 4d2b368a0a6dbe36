"""The two-pass ranking plan, written once: the first fusion over every candidate, the rows the
cross-encoder scores (the first pass's top `rerank_depth`, where the plan runs it and the request
gives it a context to read), the second fusion over those, and the final order.

Serving (`Ranker.rank`, with the cross-encoder's batcher awaited between `first_pass` and
`final`), offline ranking (`Ranker.combine`, the ablation, the retrain gate), fusion fitting and
its depth sweep (`ranking_service.fusion_fit`) all call these functions; a plan is a
`TwoPassFusion` (ranking_service.fusion), the parameters the build fitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from ranking_service.features import StageScores

if TYPE_CHECKING:
    from ranking_service.fusion import TwoPassFusion

NO_ROWS = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class FirstPass:
    """The first fusion's score per candidate, and the rows the cross-encoder is to score,
    best first (empty: the answer is the first pass)."""

    scores: np.ndarray
    rows: np.ndarray


def head(first: np.ndarray, depth: int) -> np.ndarray:
    """Indices of the first pass's top `depth`, best first (ties keep candidate order)."""
    return np.argsort(-first, kind="stable")[:depth]


def order(fused: np.ndarray) -> np.ndarray:
    """Candidate indices best first (ties keep candidate order)."""
    return np.argsort(-np.asarray(fused), kind="stable")


def reranks(plan: TwoPassFusion) -> bool:
    """Whether the plan has the cross-encoder score a head at all."""
    return plan.second is not None and plan.cross_encoder_pays


def first_pass(plan: TwoPassFusion, stages: StageScores, can_rerank: bool) -> FirstPass:
    """The first fusion (it never reads the cross-encoder) and the head the cross-encoder
    rescores: none where it cannot (`can_rerank`: a model to score with and a context to read)
    or the plan does not run it."""
    first = plan.first.fuse(replace(stages, ce=None))
    rows = head(first, plan.rerank_depth) if can_rerank and reranks(plan) else NO_ROWS
    return FirstPass(first, rows)


def head_stages(stages: StageScores, rows: np.ndarray, ce_rows: np.ndarray) -> StageScores:
    """What the second fusion reads: the head's stage scores with the cross-encoder's."""
    # float32, as serving's scores are, whatever precision an offline caller scored in.
    return replace(stages.subset(rows), ce=np.asarray(ce_rows, np.float32))


def with_ce(stages: StageScores, rows: np.ndarray, ce_rows: np.ndarray) -> StageScores:
    """The request's stage scores with the cross-encoder's for `rows` (NaN elsewhere)."""
    ce = np.full(len(stages), np.nan, np.float32)
    ce[rows] = ce_rows
    return replace(stages, ce=ce)


def place_head(first: np.ndarray, rows: np.ndarray, second: np.ndarray) -> np.ndarray:
    """One score per candidate: the head (`rows`) keeps its second-pass scores, and the rest
    keep the first pass's order, shifted below the head's lowest score."""
    fused = np.asarray(first, np.float64).copy()
    tail = np.ones(len(fused), dtype=bool)
    tail[rows] = False
    if rows.size and tail.any():
        fused[tail] -= fused[tail].max() - float(np.min(second)) + 1.0
    fused[rows] = second
    return fused.astype(np.float32)


def final(
    plan: TwoPassFusion, stages: StageScores, first: FirstPass, ce_rows: np.ndarray
) -> np.ndarray:
    """The fused score per candidate: the first pass, with its head reordered by the second
    fusion over the cross-encoder's scores of the head (`ce_rows`, in `first.rows`' order)."""
    if first.rows.size == 0:
        return first.scores
    assert plan.second is not None
    second = plan.second.fuse(head_stages(stages, first.rows, ce_rows))
    return place_head(first.scores, first.rows, second)


def rank(
    plan: TwoPassFusion,
    stages: StageScores,
    can_rerank: bool,
    score_rows: Callable[[np.ndarray], np.ndarray],
) -> tuple[FirstPass, np.ndarray]:
    """Both passes in one call, the cross-encoder's scores of the head from `score_rows`."""
    first = first_pass(plan, stages, can_rerank)
    ce_rows = score_rows(first.rows) if first.rows.size else np.zeros(0, np.float32)
    return first, final(plan, stages, first, ce_rows)
