"""The recommendation protocol: every baseline and the full pipeline, for each scored user."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from recsys.domain import Candidate, Scored
from recsys.evaluation.metrics import K
from recsys.evaluation.models import EvalModels, history_pool, score_lists
from recsys.evaluation.splits import Split, histories, relevant_items
from recsys.settings import Settings

METHODS = ("popular", "cf", "dense", "dense+ce_base", "dense+ce", "full")
POOL = 50  # candidates per user to re-rank (the gateway's default candidate_pool is 100)
CF_SHARE = Settings().cf_candidate_share
HISTORY_ITEMS = 100  # most recent history items a request carries (Settings.max_history_items)

Run = dict[str, list[str]]


@dataclass(frozen=True)
class RecommendCase:
    """One scored user: what the system sees and what counts as relevant."""

    user_id: str
    history: list[str]  # train + validation, most recent first
    relevant: set[str]


def cases(split: Split) -> list[RecommendCase]:
    """Users with at least one relevant test item, with their visible history."""
    seen = histories(split.seen())
    relevant = relevant_items(split.test)
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
    pool: int = POOL,
    cf_share: float = CF_SHARE,
    progress: bool = True,
) -> tuple[dict[str, Run], list[RecommendCase], list[list[Scored]]]:
    """Top-10 answers of every method per user, plus `full`'s ranked pools (for diversity sweeps).

    Candidates as the gateway gathers them for a request without a query: `full` ranks
    retrieval's share of the pool and CF's (gateway.candidates); the dense baselines re-rank
    retrieval's top `pool`, as the system would without CF.
    """
    users = cases(split)
    popular = popularity_order(split.seen())
    runs: dict[str, Run] = {m: {} for m in METHODS}
    contexts, dense_pools, full_pools = [], [], []
    for case in tqdm(users, desc="recommend: retrieval + cf", disable=not progress):
        history = case.history[:HISTORY_ITEMS]
        seen = set(case.history)
        runs["popular"][case.user_id] = top_k_excluding(popular, seen)
        candidates = history_pool(models.retriever, models.ranker.cf, history, seen, pool, cf_share)
        runs["cf"][case.user_id] = [i for i, _ in candidates.recalled[:K]]
        runs["dense"][case.user_id] = [h.item_id for h in candidates.hits[:K]]
        contexts.append(models.context("", history))
        dense_pools.append(models.candidates(candidates.hits))
        full_pools.append([p.candidate() for p in candidates.full])
    # The tuned cross-encoder scores the union of both pools once.
    union = [_union(d, f) for d, f in zip(dense_pools, full_pools, strict=True)]
    tuned = score_lists(
        models.tuned, contexts, union, desc="recommend: dense+ce", progress=progress
    )
    base = score_lists(
        models.base, contexts, dense_pools, desc="recommend: dense+ce_base", progress=progress
    )
    ranked: list[list[Scored]] = []
    for case, context, dense, full, candidates, ce, ce_base in zip(
        users, contexts, dense_pools, full_pools, union, tuned, base, strict=True
    ):
        ce_of = dict(zip((c.item_id for c in candidates), ce, strict=True))
        runs["dense+ce"][case.user_id] = _top(dense, np.array([ce_of[c.item_id] for c in dense]))
        runs["dense+ce_base"][case.user_id] = _top(dense, ce_base)
        outcome = models.ranker.combine(context, full, np.array([ce_of[c.item_id] for c in full]))
        runs["full"][case.user_id] = [s.item_id for s in outcome.scored[:K]]
        ranked.append(outcome.scored)
    return runs, users, ranked


def _union(first: list[Candidate], second: list[Candidate]) -> list[Candidate]:
    ids = {c.item_id for c in first}
    return first + [c for c in second if c.item_id not in ids]


def _top(candidates: Sequence[Candidate], scores: np.ndarray) -> list[str]:
    return [candidates[i].item_id for i in np.argsort(-scores, kind="stable")[:K]]
