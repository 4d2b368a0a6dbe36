"""The build's validation search over ALS's hyper-parameters.

CF is fitted on the training interactions with each setting tried and scored by the NDCG@10 of
CF alone recommending each validation user's held-out items from their training history: the
evaluation's `cf` method (RankingService.RecallCandidates for a history-only request: the user
folded in from their most recent `max_history_items`, everything seen excluded). The search is
coordinate descent from the given values: one dimension at a time, each of its values tried
with the others as they stand, the best kept (the incumbent wins ties), for at most `passes`
passes and stopping after a pass that changed nothing. Nothing in it is random beyond ALS's
seeded initialisation, so the same data gives the same choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from ranking_service.cf import WEIGHTINGS, ALSParams
from ranking_service.item_item import ItemItem
from recsys.offline.heldout import HeldOut

log = logging.getLogger(__name__)

# Tried in this order (weighting and confidence scaling first: they move the most).
GRID: Mapping[str, Sequence[Any]] = {
    "weighting": WEIGHTINGS,
    "alpha": (1.0, 2.0, 10.0, 40.0),
    "regularization": (0.01, 0.05, 0.2, 1.0),
    "factors": (32, 64, 128, 256),
    "iterations": (15, 30),
}
PASSES = 2
# Fewer validation users with held-out items (and training history) than this: the figures
# would be noise, and the build keeps the values it was given.
MIN_USERS = 20
METRIC = (
    "ndcg@10 of CF alone on validation users (fitted on train; each user folded in from their "
    "train history, everything seen excluded)"
)


@dataclass(frozen=True)
class CFSearch:
    """The values to train with and the manifest's record of how they were chosen."""

    params: ALSParams
    record: dict[str, Any]


def search_cf(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    start: ALSParams,
    seed: int = 0,
    relevant_min_weight: float | None = None,
    grid: Mapping[str, Sequence[Any]] = GRID,
    passes: int = PASSES,
    min_users: int = MIN_USERS,
) -> CFSearch:
    """Coordinate descent over `grid` from `start` (see the module); held-out interactions
    weighing at least `relevant_min_weight` are relevant (None: every one)."""
    from recsys.core.settings import default

    users = HeldOut.of(train, validation, relevant_min_weight)
    reason = _too_few_users(users, min_users, "trained with the values given")
    if reason is not None:
        log.info("CF search %s", reason)
        return CFSearch(start, {"skipped": reason})

    window = default("max_history_items")
    started = time.perf_counter()
    scores: dict[ALSParams, float] = {}

    def score(params: ALSParams) -> float:
        if params not in scores:
            t0 = time.perf_counter()
            model = CFRecent(window, params.kwargs(), seed)
            model.fit(train)
            scores[params] = users.ndcg(model)
            log.info(
                "CF search: %s -> validation ndcg@10 %.4f (%.1f s)",
                _text(params),
                scores[params],
                time.perf_counter() - t0,
            )
        return scores[params]

    best = start
    score(best)
    done = 0
    for _ in range(passes):
        done += 1
        before = best
        for name, values in grid.items():
            for value in values:
                candidate = replace(best, **{name: value})
                if score(candidate) > scores[best]:
                    best = candidate
        if best == before:
            break
    seconds = time.perf_counter() - started
    log.info(
        "CF search: %d fits in %.0f s, %d pass(es): %s (validation ndcg@10 %.4f; the values "
        "given: %.4f)",
        len(scores),
        seconds,
        done,
        _text(best),
        scores[best],
        scores[start],
    )
    return CFSearch(
        best,
        {
            "metric": METRIC,
            "validation_users": len(users.relevant),
            "relevant_min_weight": relevant_min_weight,
            "grid": {name: list(values) for name, values in grid.items()},
            "start": {**start.kwargs(), "ndcg@10": round(scores[start], 4)},
            "chosen": {**best.kwargs(), "ndcg@10": round(scores[best], 4)},
            "tried": [
                {**params.kwargs(), "ndcg@10": round(value, 4)} for params, value in scores.items()
            ],
            "passes": done,
            "fits": len(scores),
            "seconds": round(seconds, 1),
        },
    )


class CFRecent:
    """Short-term CF: the ALS user folded in from only the `window` most recent history items
    (ALS with the given hyper-parameters, fitted here on the given interactions)."""

    def __init__(self, window: int, cf_params: Mapping[str, Any], seed: int = 0) -> None:
        self.window = window
        self.cf_params = dict(cf_params)
        self.seed = seed

    def fit(self, interactions: pd.DataFrame) -> None:
        from ranking_service.cf import CFModel

        self.cf = CFModel.train(interactions, seed=self.seed, **self.cf_params)

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        user = self.cf.fold_in(list(history[: self.window]))
        if user is None:
            return []
        return [item for item, _ in self.cf.recommend(user, k, {*exclude, *history})]


def _too_few_users(users: HeldOut, min_users: int, instead: str) -> str | None:
    """Why a validation search is skipped (None: it is not): fewer than `min_users` validation
    users to score on; `instead` says what is trained then."""
    if len(users.relevant) >= min_users:
        return None
    return (
        f"skipped: {len(users.relevant)} validation users with held-out items and train history "
        f"(need {min_users}); {instead}"
    )


def _text(params: ALSParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.kwargs().items())


# EASE's regularisation values the build tries (ranking_service.item_item).
LAMBDAS = (10.0, 50.0, 200.0, 1000.0)
ITEM_ITEM_METRIC = (
    "ndcg@10 of EASE alone on validation users (fitted on train; scored from each user's train "
    "history, everything seen excluded)"
)


@dataclass(frozen=True)
class ItemItemSearch:
    """The model trained with the chosen lambda (None: no interactions to train on), the
    lambda, and the manifest's record of how it was chosen."""

    model: ItemItem | None
    lam: float
    record: dict[str, Any]


def search_item_item(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    relevant_min_weight: float | None = None,
    lambdas: Sequence[float] = LAMBDAS,
    min_users: int = MIN_USERS,
) -> ItemItemSearch:
    """EASE's lambda by validation NDCG@10 (the smallest wins ties), and the model fitted on
    `train` with it; the default where there are fewer than `min_users` validation users."""
    from ranking_service.item_item import DEFAULT_LAMBDA

    users = HeldOut.of(train, validation, relevant_min_weight)
    reason = _too_few_users(users, min_users, f"lambda {DEFAULT_LAMBDA:g}")
    if reason is not None:
        log.info("item-to-item search %s", reason)
        return ItemItemSearch(
            ItemItem.train(train, DEFAULT_LAMBDA), DEFAULT_LAMBDA, {"skipped": reason}
        )
    started = time.perf_counter()
    tried: list[dict[str, float]] = []
    best: dict[str, float] | None = None
    chosen: ItemItem | None = None
    for lam in lambdas:
        model = ItemItem.train(train, lam)
        score = 0.0 if model is None else users.ndcg(_EaseList(model))
        tried.append({"lambda": lam, "ndcg@10": round(score, 4)})
        log.info("item-to-item search: lambda %g -> validation ndcg@10 %.4f", lam, score)
        if best is None or tried[-1]["ndcg@10"] > best["ndcg@10"]:
            best, chosen = tried[-1], model  # only the best fit so far is kept
    assert best is not None
    return ItemItemSearch(
        chosen,
        float(best["lambda"]),
        {
            "metric": ITEM_ITEM_METRIC,
            "validation_users": len(users.relevant),
            "tried": tried,
            "chosen": best,
            "seconds": round(time.perf_counter() - started, 1),
        },
    )


@dataclass(frozen=True)
class _EaseList:
    """The item-to-item model's EASE list as a HeldOut model."""

    model: Any

    def recommend(self, history: Sequence[str], k: int, exclude: Collection[str]) -> list[str]:
        lists = self.model.recommend(history, k, exclude)
        return [item for item, _ in lists[0]] if lists else []
