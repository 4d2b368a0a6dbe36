"""The build's fusion fitting: held-out lists from the pools serving would gather, the two passes
per request kind (ranking_service.fusion_fit), which cross-encoder copy serves
(ranking_service.copy_choice), and rerank depths cut to the serving copy's time budget.

Recommendations are fitted on the validation users (train history → the pool → was each
candidate among the user's validation items?), searches on held-out queries. Each kind falls
back to the convex mix where too few lists have a relevant candidate.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ranking_service.copy_choice import choose_copy
from ranking_service.cross_encoder import CrossEncoderScorer, context_text
from ranking_service.fusion import ContextFusion, ConvexFusion, TwoPassFusion
from ranking_service.fusion_fit import FusionList, fit_two_pass, sweep_sample, within_budget
from ranking_service.train import EXAMPLE_HISTORY
from recsys.core import bundle as bundle_files
from recsys.core.domain import Candidate
from recsys.offline.heldout import HeldOut
from recsys.offline.local import Pools

log = logging.getLogger(__name__)

Queries = Sequence[tuple[str, Sequence[str]]]
FUSION_QUERY_SHARE = 0.3  # of the training queries, kept out of fine-tuning to fit search fusion
# Of the products, treated as added after the build in the recommendation lists fusion is fitted
# on: serving ranks such products by their text alone, and fusion learns how only from relevant
# ones it has seen so. Drawn uniformly, as the evaluation's new-products protocol holds them out.
NEW_ITEM_SHARE = 0.1


@dataclass(frozen=True)
class FittingSettings:
    """What the build's options say about fusion fitting."""

    seed: int
    fusion_alpha: float  # the convex fallback's
    fusion_lists: int | None  # held-out lists per kind the sweep and second pass read
    rerank_budget_ms: float
    relevant_min_weight: float | None
    device: str
    max_length: int | None  # the fine-tuned cross-encoder's; None: the build has none


def hold_out_queries(queries: Queries, seed: int) -> tuple[list[Any], list[Any]]:
    """(queries to fine-tune on, queries to fit the search fusion on), disjoint.

    The fusion must see the cross-encoder on queries it was not trained on, or it would learn
    to trust it more than it deserves.
    """
    shuffled = sorted(queries, key=lambda q: q[0])
    random.Random(seed).shuffle(shuffled)
    held = round(len(shuffled) * FUSION_QUERY_SHARE)
    return shuffled[held:], shuffled[:held]


def validation_queries(validation: pd.DataFrame) -> list[tuple[str, Sequence[str]]]:
    """Held-out searches: each query text of the validation interactions with its items."""
    if "query" not in validation or not len(validation):
        return []
    searched = validation[validation["query"].astype(str).str.strip() != ""]
    return [
        (str(query).strip(), sorted({str(i) for i in group["item_id"]}))
        for query, group in searched.groupby(searched["query"].astype(str).str.strip(), sort=True)
    ]


@dataclass
class FittedPasses:
    """Both request kinds' two passes as fitted, with what choosing the serving copy reads: the
    fine-tuned model's scores of the pairs the sweep scored, and each kind's sweep sample."""

    passes: dict[str, TwoPassFusion]
    score_pairs: _Remembered | None = None  # None: the build has no cross-encoder
    samples: dict[str, list[FusionList]] = field(default_factory=dict)

    @property
    def cross_encoder_pays(self) -> bool:
        """Whether the second pass raised validation NDCG@10 for some kind of request."""
        return any(p.cross_encoder_pays for p in self.passes.values())

    def fusion(self) -> ContextFusion:
        return ContextFusion(**self.passes)


def fit_fusion(
    fitting: FittingSettings,
    pools: Pools,
    stage: Path,
    held_out: HeldOut,
    queries: Queries,
    searched: bool,
    tuned_queries: Queries = (),
) -> FittedPasses:
    """Two passes for recommendations (the `held_out` users) and two for searches (held-out
    `queries`), the second read from the cross-encoder under `stage` where the build has one.
    Searches never use a cross-encoder that was not fine-tuned on any (`searched`); their first
    pass, which never reads it, is fitted on the `tuned_queries` it was fine-tuned on as well:
    held-out queries alone are too few for a stable fit."""
    convex = ConvexFusion(alpha=fitting.fusion_alpha)
    history_lists = user_lists(pools, held_out, fitting.seed)
    query_lists = search_lists(pools, queries, fitting.seed)
    tuned_lists = search_lists(pools, tuned_queries, fitting.seed, "fusion: tuned queries")
    score_pairs = None
    if fitting.max_length is not None:
        scorer = CrossEncoderScorer.load(
            stage / bundle_files.CROSS_ENCODER_DIR, fitting.device, fitting.max_length
        )
        # Remembered: the copies are compared on the very pairs the sweep scored.
        score_pairs = _Remembered(scorer.score)
    meta: dict[str, Any] = {"pool": pools.size, "cf_share": pools.policy.cf_share}
    query_meta = dict(meta)
    if not searched:
        # With no second pass, searches keep the first pass (the fallback: retrieval's order).
        query_meta["cross_encoder"] = "skipped: never fine-tuned on a query"
        log.warning("fusion for searches: the data has no queries; the cross-encoder is skipped")
    passes = {
        "history": fit_two_pass(
            history_lists,
            score_pairs,
            convex,
            requests="validation users",
            sweep_lists=fitting.fusion_lists,
            budget_ms=fitting.rerank_budget_ms,
            **meta,
        ),
        "query": fit_two_pass(
            query_lists,
            score_pairs if searched else None,
            convex,
            requests="held-out queries",
            sweep_lists=fitting.fusion_lists,
            first_lists=query_lists + tuned_lists,
            budget_ms=fitting.rerank_budget_ms,
            **query_meta,
        ),
    }
    samples = {
        "history": sweep_sample(history_lists, fitting.fusion_lists),
        "query": sweep_sample(query_lists, fitting.fusion_lists),
    }
    return FittedPasses(passes, score_pairs, samples)


def with_serving_copy(
    fitting: FittingSettings,
    stage: Path,
    fitted: FittedPasses,
    student_agreement: float | None = None,
) -> tuple[ContextFusion, dict[str, Any]]:
    """The fusion to serve and the record of which cross-encoder copy under `stage` serves it
    (the fine-tuned model itself where the build made no other), with each kind's rerank depth
    cut to the time budget at that copy's speed. Without a cross-encoder: the passes as fitted."""
    if fitted.score_pairs is None or fitting.max_length is None:
        return fitted.fusion(), {}
    score_pairs = fitted.score_pairs
    chosen = choose_copy(
        stage, fitting.max_length, score_pairs, fitted.passes, fitted.samples, student_agreement
    )
    passes = {
        kind: _within_budget(fitting, kind, two_pass, fitted.samples[kind], score_pairs, chosen)
        for kind, two_pass in fitted.passes.items()
    }
    return ContextFusion(**passes), chosen


def _within_budget(
    fitting: FittingSettings,
    kind: str,
    two_pass: TwoPassFusion,
    sample: list[FusionList],
    score_pairs: _Remembered,
    chosen: dict[str, Any],
) -> TwoPassFusion:
    """`two_pass` with its rerank depth cut to the budget at the speed of the copy that serves
    (measured on this kind's held-out pairs)."""
    rows = chosen["parity"].get(kind)
    if rows is None:
        return two_pass
    speed = rows[chosen["serving_copy"]]["pairs_per_s"]
    return within_budget(two_pass, sample, score_pairs, speed, fitting.rerank_budget_ms)


class _Remembered:
    """A pair scorer that scores each distinct pair once."""

    def __init__(self, score: Any) -> None:
        self._score = score
        self._known: dict[tuple[str, str], float] = {}

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        new = list(dict.fromkeys(p for p in pairs if p not in self._known))
        if new:
            self._known.update(zip(new, self._score(new).tolist(), strict=True))
        return np.array([self._known[p] for p in pairs], np.float32)


def user_lists(pools: Pools, held_out: HeldOut, seed: int) -> list[FusionList]:
    """Every held-out user's list, in a seeded random order: their history → the pool serving
    would gather → was each candidate among the user's held-out items? A seeded share of the
    products (`simulated_new`) appears in them as if added after the build."""
    users = held_out.users(seed=seed)
    seen = held_out.histories
    requests = [pools.request(history=seen[u][:EXAMPLE_HISTORY], exclude=seen[u]) for u in users]
    gathered = pools.gather(requests, desc="fusion: validation users")
    new = simulated_new(pools.ranker.cf.item_ids, seed)
    return [
        as_new(fusion_list(pools, pool, held_out.relevant[u]), pool.candidates(), new)
        for u, pool in zip(users, gathered, strict=True)
    ]


def simulated_new(item_ids: Sequence[str], seed: int) -> set[str]:
    """A seeded NEW_ITEM_SHARE of the products, each as likely as any other."""
    ids = sorted(item_ids)
    return set(random.Random(seed).sample(ids, round(len(ids) * NEW_ITEM_SHARE)))


def as_new(fusion: FusionList, candidates: Sequence[Candidate], new: set[str]) -> FusionList:
    """The list as serving would gather and score it had the products in `new` been added
    after the build: only retrieval could propose them (CF's candidates among them are
    dropped), and they have no collaborative scores (StageScores.as_new)."""
    is_new = np.array([c.item_id in new for c in candidates], dtype=bool)
    retrieved = np.array([c.retrieval_score is not None for c in candidates], dtype=bool)
    keep = np.flatnonzero(~is_new | retrieved)
    scores = fusion.scores.subset(keep).as_new(np.flatnonzero(is_new[keep]))
    texts = tuple(fusion.texts[i] for i in keep) if fusion.texts else ()
    return FusionList(scores, fusion.labels[keep], fusion.context, texts)


def search_lists(
    pools: Pools, queries: Queries, seed: int, desc: str = "fusion: held-out queries"
) -> list[FusionList]:
    """Every query's list, in a seeded random order: the pool serving would gather for the
    query text."""
    queries = list(queries)
    random.Random(seed).shuffle(queries)
    gathered = pools.gather([pools.request(query=query) for query, _ in queries], desc=desc)
    return [
        fusion_list(pools, pool, set(relevant))
        for (_, relevant), pool in zip(queries, gathered, strict=True)
    ]


def fusion_list(pools: Pools, pool: Any, relevant: set[str]) -> FusionList:
    """One pool as fusion reads it: stage scores, labels and the cross-encoder's texts."""
    context, candidates = pool.context(), pool.candidates()
    stages, _ = pools.ranker.stage_scores(context, candidates)
    labels = np.array([c.item_id in relevant for c in candidates], dtype=np.float64)
    return FusionList(stages, labels, context_text(context), tuple(c.text for c in candidates))
