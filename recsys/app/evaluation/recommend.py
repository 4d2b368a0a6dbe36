"""The recommendation protocol: every baseline and the full pipeline, for each scored user."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from gateway.candidates import CandidatePool, with_new_item
from ranking_service.ranker import Ranker
from recsys.app.evaluation.baselines import NAMES as BASELINES
from recsys.app.evaluation.baselines import Baseline, run_baselines
from recsys.app.evaluation.metrics import K
from recsys.app.evaluation.models import EvalModels, rerank
from recsys.core.domain import RankContext, Scored
from recsys.core.errors import NotFound
from recsys.core.settings import default
from recsys.offline.local import pool_request
from recsys.offline.splits import Split, histories, relevant_items

# What run_recommend computes from the bundle; the tuned baselines (baselines.py) join the
# report after `cf`.
CROSS_ENCODER_BASELINES = ("dense+ce_base", "dense+ce")
PIPELINE_METHODS = ("popular", "cf", "dense", *CROSS_ENCODER_BASELINES, "full")
METHODS = ("popular", "cf", *BASELINES, "dense", *CROSS_ENCODER_BASELINES, "full")
HISTORY_ITEMS = default("max_history_items")  # most recent history items a request carries

Run = dict[str, list[str]]


@dataclass(frozen=True)
class RecommendCase:
    """One scored user: what the system sees and what counts as relevant."""

    user_id: str
    history: list[str]  # train + validation, most recent first
    relevant: set[str]


def cases(split: Split) -> list[RecommendCase]:
    """Users with at least one relevant test item (by the split's rule), with their visible
    history."""
    seen = histories(split.seen())
    relevant = relevant_items(split.test, split.relevant_min_weight)
    return [RecommendCase(u, seen.get(u, []), relevant[u]) for u in sorted(relevant)]


def popularity_order(seen: pd.DataFrame) -> list[str]:
    return [str(i) for i in seen["item_id"].value_counts().index]


def top_k_excluding(order: Sequence[str], exclude: set[str], k: int = K) -> list[str]:
    out = []
    for item in order:
        if item not in exclude:
            out.append(item)
            if len(out) == k:
                break
    return out


def run_recommend(
    models: EvalModels,
    split: Split,
    pool: int,
    progress: bool = True,
    baselines: Mapping[str, Baseline] | None = None,
    ce_users: Collection[str] | None = None,
) -> tuple[dict[str, Run], list[RecommendCase], list[Ranked]]:
    """Top-10 answers of the pipeline's methods and the given (fitted) `baselines` per user,
    plus `full`'s ranked pools (for diversity sweeps). The cross-encoder baselines answer only
    `ce_users` (None: every user).

    Each user is a history-only Recommend (their visible history, everything seen excluded):
    `full` ranks the pool the gateway gathers for it (gateway.candidates); the dense baselines
    re-rank the pool retrieval alone would gather, as the system would without CF.
    """
    users = cases(split)
    popular = popularity_order(split.seen())
    runs: dict[str, Run] = {m: {} for m in PIPELINE_METHODS}
    runs.update(run_baselines(baselines or {}, users))
    # A user seen only in test has nothing to gather from: every pool stays empty.
    asked = [c for c in users if c.history]
    requests = [
        pool_request(pool, history=c.history[:HISTORY_ITEMS], exclude=c.history) for c in asked
    ]
    full = _by_user(asked, models.pools(requests, _desc("recommend: candidates", progress)))
    dense = _by_user(
        asked, models.pools(requests, _desc("recommend: dense candidates", progress), cf_share=0)
    )
    contexts, dense_pools, full_pools = [], [], []
    for case in users:
        runs["popular"][case.user_id] = top_k_excluding(popular, set(case.history))
        runs["cf"][case.user_id] = cf_top(models.ranker, case)
        f, d = full.get(case.user_id), dense.get(case.user_id)
        runs["dense"][case.user_id] = [p.item_id for p in d.items[:K]] if d else []
        contexts.append(f.context() if f else RankContext())
        sampled = ce_users is None or case.user_id in ce_users
        dense_pools.append(d.candidates() if d and sampled else [])
        full_pools.append(f.candidates() if f else [])
    ranked: list[Ranked] = []
    answers = rerank(models, contexts, dense_pools, full_pools, "recommend", progress)
    for case, answer in zip(users, answers, strict=True):
        if ce_users is None or case.user_id in ce_users:
            runs["dense+ce"][case.user_id] = answer.dense_ce
            runs["dense+ce_base"][case.user_id] = answer.dense_ce_base
        gathered = full.get(case.user_id)
        slotted = (gathered.new_item, gathered.new_item_slot) if gathered else (None, 0)
        ranked.append(Ranked(answer.full, *slotted))
        order = [s.item_id for s in answer.full]
        runs["full"][case.user_id] = ranked[-1].answer(order)
    return runs, users, ranked


@dataclass(frozen=True)
class Ranked:
    """`full`'s ranking of one user's pool, and the pool's new product and the position kept
    for it (gateway.candidates)."""

    scored: list[Scored]
    new_item: str | None
    new_item_slot: int

    def answer(self, order: list[str]) -> list[str]:
        """The top 10 the gateway answers with from `order` (ranking's, or diversity's)."""
        return with_new_item(order, str, self.new_item, self.new_item_slot)[:K]


def cf_top(ranker: Ranker, case: RecommendCase) -> list[str]:
    """ALS's own top 10 (RankingService.RecallCandidates without the item-to-item lists, which
    the `ease` baseline stands for), everything seen excluded."""
    try:
        als = ranker.with_cf(ranker.cf, None)
        recall = als.recall("", case.history[:HISTORY_ITEMS], K, case.history)
    except NotFound:
        return []  # CF knows none of the user's items
    return [item for item, _ in recall.items]


def _by_user(
    cases: Sequence[RecommendCase], pools: list[CandidatePool]
) -> dict[str, CandidatePool]:
    return {c.user_id: p for c, p in zip(cases, pools, strict=True)}


def _desc(text: str, progress: bool) -> str | None:
    return text if progress else None
