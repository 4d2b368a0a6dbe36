"""The recommendation protocol: every baseline and the full pipeline, for each scored user."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm import tqdm

from recsys.domain import RankContext, SearchQuery
from recsys.evaluation.metrics import K
from recsys.evaluation.models import EvalModels, score_lists
from recsys.evaluation.splits import Split, histories, relevant_items

METHODS = ("popular", "cf", "dense", "dense+ce_base", "dense+ce", "full")
POOL = 100  # candidates retrieved for re-ranking, as the gateway's default candidate_pool
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
    models: EvalModels, split: Split, pool: int = POOL, progress: bool = True
) -> tuple[dict[str, Run], list[RecommendCase], dict[str, list[tuple[RankContext, list]]]]:
    """Top-10 answers of every method per user, plus the ranked pools (for diversity sweeps)."""
    users = cases(split)
    popular = popularity_order(split.seen())
    runs: dict[str, Run] = {m: {} for m in METHODS}
    contexts, pools = [], []
    cf = models.ranker.cf
    for case in tqdm(users, desc="recommend: retrieval + cf", disable=not progress):
        history = case.history[:HISTORY_ITEMS]
        seen = set(case.history)
        runs["popular"][case.user_id] = top_k_excluding(popular, seen)
        vector = cf.fold_in(history)
        runs["cf"][case.user_id] = (
            [i for i, _ in cf.recommend(vector, K, exclude=seen)] if vector is not None else []
        )
        hits, _ = models.retriever.search(
            SearchQuery(
                top_k=pool,
                history_item_ids=tuple(history),
                exclude_item_ids=frozenset(seen),
            )
        )
        runs["dense"][case.user_id] = [h.item_id for h in hits[:K]]
        contexts.append(models.context("", history))
        pools.append(models.candidates(hits))
    ranked_pools: dict[str, list[tuple[RankContext, list]]] = {"full": []}
    for name, scorer in (("dense+ce", models.tuned), ("dense+ce_base", models.base)):
        scores = score_lists(scorer, contexts, pools, desc=f"recommend: {name}", progress=progress)
        for case, pool_items, ce in zip(users, pools, scores, strict=True):
            order = np.argsort(-ce, kind="stable")[:K]
            runs[name][case.user_id] = [pool_items[i].item_id for i in order]
            if name == "dense+ce":
                context = contexts[len(ranked_pools["full"])]
                outcome = models.ranker.combine(context, pool_items, ce)
                runs["full"][case.user_id] = [s.item_id for s in outcome.scored[:K]]
                ranked_pools["full"].append((context, outcome.scored))
    return runs, users, ranked_pools
