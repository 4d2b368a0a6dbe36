"""Users unseen at training: one user in five is held out of CF's training entirely and
answered from the history they give at request time (CF folds them in), next to most-popular,
CF fold-in and short-term CF, each fitted without them too.

CF is the only per-user model. The bundle's fusion weights and cross-encoder were fitted with
every user's training interactions; the report says whether its plan runs the cross-encoder
for recommendations at all. Beside them, a reference that is not a competitor: the same
requests answered by the bundle itself, which was trained with these users, so the report
separates what being unseen costs from how hard these users are.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pandas as pd

from ranking_service.ranker import Ranker
from recsys.app.evaluation import recommend
from recsys.app.evaluation.ablation import VARIANTS, rank_top
from recsys.app.evaluation.metrics import (
    BOOTSTRAP_DRAWS,
    K,
    accuracy,
    bootstrap,
    paired_bootstrap_ratio,
    per_query_ndcg,
)
from recsys.app.evaluation.models import EvalModels
from recsys.offline.cf_search import CFRecent
from recsys.offline.local import gather_pools, pool_request
from recsys.offline.splits import Split

HELD_OUT_EVERY = 5  # a user is held out when the first byte of md5(user id) divides by this
METHODS = ("popular", "cf", "cf_recent", "full")


def held_out(user_id: str) -> bool:
    return hashlib.md5(user_id.encode()).digest()[0] % HELD_OUT_EVERY == 0


def without_held_out(interactions: pd.DataFrame) -> pd.DataFrame:
    return interactions[~interactions["user_id"].astype(str).map(held_out)]


def run_unseen(
    models: EvalModels, split: Split, pool: int, recent_window: int, progress: bool
) -> tuple[dict[str, dict[str, list[str]]], dict[str, set[str]], int]:
    """Each method's top 10 per held-out user with a relevant test item, their relevant items,
    and how many interactions the models were fitted on (everything visible, minus theirs)."""
    training = without_held_out(split.seen())
    ranker = models.ranker_refitted_on(training)
    cases = held_out_cases(split)
    full = full_answers(models, ranker, cases, pool, "unseen users" if progress else None)
    recent = CFRecent(recent_window, models.cf_params, models.seed)
    recent.fit(training)
    popular = recommend.popularity_order(training)
    runs: dict[str, dict[str, list[str]]] = {name: {} for name in METHODS}
    for case in cases:
        seen = set(case.history)
        runs["popular"][case.user_id] = recommend.top_k_excluding(popular, seen)
        runs["cf"][case.user_id] = recommend.cf_top(ranker, case)
        runs["cf_recent"][case.user_id] = (
            recent.recommend(case.history, K, seen) if case.history else []
        )
        runs["full"][case.user_id] = full.get(case.user_id, [])
    return runs, {c.user_id: c.relevant for c in cases}, len(training)


def held_out_cases(split: Split) -> list[recommend.RecommendCase]:
    return [c for c in recommend.cases(split) if held_out(c.user_id)]


def full_answers(
    models: EvalModels,
    ranker: Ranker,
    cases: list[recommend.RecommendCase],
    pool: int,
    progress: str | None,
) -> dict[str, list[str]]:
    """The full pipeline's top 10 per case with a history, answered from the history alone by
    `ranker` (pools gathered with it too); `progress`: the progress bars' label, None for none."""
    asked = [c for c in cases if c.history]
    requests = [
        pool_request(pool, history=c.history[: recommend.HISTORY_ITEMS], exclude=c.history)
        for c in asked
    ]
    desc = f"{progress}: candidates" if progress else None
    pools = gather_pools(requests, models.retriever, ranker, models.policy, desc)
    ranked = rank_top(models, ranker, pools, VARIANTS[0], bool(progress))
    return dict(zip((c.user_id for c in asked), ranked, strict=True))


def seen_reference(
    models: EvalModels,
    split: Split,
    unseen_full: dict[str, list[str]],
    pool: int,
    progress: bool,
) -> dict[str, Any]:
    """The same users' requests answered by the bundle, whose models were trained with them,
    and full-unseen over that, paired per user."""
    cases = held_out_cases(split)
    relevant = {c.user_id: c.relevant for c in cases}
    label = "unseen users, seen reference" if progress else None
    seen = full_answers(models, models.ranker, cases, pool, label)
    return {
        "full, users seen at training": accuracy(relevant, seen),
        "unseen / seen": paired_bootstrap_ratio(
            per_query_ndcg(relevant, unseen_full),
            per_query_ndcg(relevant, seen),
            BOOTSTRAP_DRAWS,
        ),
    }


def evaluate_unseen(
    models: EvalModels, split: Split, pool: int, recent_window: int, progress: bool
) -> dict[str, Any]:
    """The unseen-users section of the report."""
    runs, relevant, fitted_on = run_unseen(models, split, pool, recent_window, progress)
    return {
        "users": len(relevant),
        "held_out": f"users whose md5(user id) first byte divides by {HELD_OUT_EVERY}",
        "fitted_on_interactions": fitted_on,
        "cf_recent_window": recent_window,
        "cross_encoder_in_plan": models.ranker.plan(False).cross_encoder_pays,
        "methods": {name: accuracy(relevant, runs[name]) for name in METHODS},
        "bootstrap": bootstrap(relevant, runs),
        "reference": seen_reference(models, split, runs["full"], pool, progress),
    }
