"""The full recommendation pipeline with one component removed, on validation and test.

Two measures per variant. As served: the variant reuses the bundle's fusion and drops a
component at serving time (its candidates from the pool, its scores as missing), which is what
turning it off in a deployed bundle would do. Refitted: the first fusion pass is fitted again
without the component on the validation users' lists, as a build without it would (the
cross-encoder's second pass is left out of both sides), which is what the component is worth
to a pipeline built around its absence. On validation the pipeline's CF is refitted on train
alone with the bundle's hyper-parameters, as the build had it when it fitted fusion there
(the served CF has seen validation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from gateway.candidates import CandidatePool, with_new_item
from ranking_service import plan
from ranking_service.cross_encoder import context_text
from ranking_service.features import StageScores
from ranking_service.fusion import ConvexFusion
from ranking_service.fusion_fit import FusionList, fit_two_pass
from ranking_service.ranker import Ranker
from recsys.app.evaluation.metrics import K, paired_bootstrap_ratio, per_query_ndcg
from recsys.app.evaluation.models import EvalModels, score_lists
from recsys.app.evaluation.recommend import HISTORY_ITEMS
from recsys.core.domain import Candidate, RankContext
from recsys.offline.local import gather_pools, pool_request
from recsys.offline.splits import Split


@dataclass(frozen=True)
class Variant:
    name: str
    cf_share: float | None  # the pool's CF share; None: the bundle's
    # Components dropped (ranking_service.features groups): their signals missing to fusion;
    # "cross_encoder" drops the second pass, where the bundle's plan runs it.
    drops: tuple[str, ...]
    means: str


VARIANTS = (
    Variant("full", None, (), "the pipeline as evaluated above"),
    Variant(
        "without cross-encoder",
        None,
        ("cross_encoder",),
        "first fusion pass only: the cross-encoder's second pass dropped",
    ),
    Variant(
        "without CF",
        0.0,
        ("cf", "item_item"),
        "pool from dense retrieval alone; CF, short-term CF and item-to-item scores dropped as "
        "missing (the popularity prior stays)",
    ),
    Variant(
        "without item-to-item",
        None,
        ("item_item",),
        "EASE and transition scores dropped as missing, and CF's recall without their lists",
    ),
    Variant(
        "without dense retrieval",
        1.0,
        (),
        "pool from CF recall alone, so no retrieval candidates or scores",
    ),
    Variant(
        "without content similarity",
        None,
        ("content",),
        "the embedding similarities to the history's items and the text sequence model's "
        "scores dropped as missing",
    ),
    Variant(
        "without language-model components",
        1.0,
        ("cross_encoder", "content"),
        "no dense retrieval (pool from CF alone), content similarity, text sequence model or "
        "cross-encoder",
    ),
)


@dataclass(frozen=True)
class Stage:
    """Who is asked (visible history, most recent first) and what is relevant, per user."""

    name: str
    ranker: Ranker
    histories: dict[str, list[str]]
    relevant: dict[str, set[str]]


@dataclass(frozen=True)
class StageAnswers:
    """Per variant: the served top 10 per user, and each user's first-pass inputs (stage
    scores with the component dropped, candidate ids) for refitting."""

    served: dict[str, dict[str, list[str]]]
    lists: dict[str, dict[str, tuple[StageScores, list[str]]]]


def answers(models: EvalModels, stage: Stage, pool: int, progress: bool) -> StageAnswers:
    """Each variant's answers for the users of the stage who have a history."""
    users = [u for u in sorted(stage.relevant) if stage.histories.get(u)]
    requests = [
        pool_request(pool, history=stage.histories[u][:HISTORY_ITEMS], exclude=stage.histories[u])
        for u in users
    ]
    # A variant without item-to-item gathers CF's recall without its lists too.
    gatherings = {(v.cf_share, "item_item" in v.drops) for v in VARIANTS}
    pools: dict[tuple[float | None, bool], list[CandidatePool]] = {}
    for share, plain in gatherings:
        policy = models.policy if share is None else replace(models.policy, cf_share=share)
        ranker = stage.ranker.with_cf(stage.ranker.cf, None) if plain else stage.ranker
        desc = f"ablation ({stage.name}): pools, cf_share {share}" if progress else None
        pools[share, plain] = gather_pools(requests, models.retriever, ranker, policy, desc)
    out = StageAnswers({}, {})
    for variant in VARIANTS:
        gathered = pools[variant.cf_share, "item_item" in variant.drops]
        inputs = _inputs(stage.ranker, gathered, variant)
        ranked = _answers(
            models, gathered, _rank_inputs(models, stage.ranker, inputs, variant, progress)
        )
        out.served[variant.name] = {u: ranked[i] for i, u in enumerate(users)}
        out.lists[variant.name] = {
            u: (scores, [c.item_id for c in cands])
            for u, (_, cands, scores) in zip(users, inputs, strict=True)
        }
    return out


Inputs = list[tuple[RankContext, list[Candidate], StageScores]]


def _inputs(ranker: Ranker, pools: Sequence[CandidatePool], variant: Variant) -> Inputs:
    """Each pool's context, candidates and stage scores with the variant's component dropped."""
    out = []
    for pool in pools:
        context, cands = pool.context(), pool.candidates()
        out.append((context, cands, ranker.stage_scores(context, cands)[0].without(*variant.drops)))
    return out


def rank_top(
    models: EvalModels,
    ranker: Ranker,
    pools: Sequence[CandidatePool],
    variant: Variant,
    progress: bool,
) -> list[list[str]]:
    """The top 10 of Ranker.combine's two passes over each pool, with the variant's component
    dropped (the serving cross-encoder scores each head where the plan runs it), and the
    pool's new product placed as the gateway places it."""
    orders = _rank_inputs(models, ranker, _inputs(ranker, pools, variant), variant, progress)
    return _answers(models, pools, orders)


def _answers(
    models: EvalModels, pools: Sequence[CandidatePool], orders: list[list[str]]
) -> list[list[str]]:
    """The top 10 the gateway answers with, from ranking's whole order of each pool."""
    return [
        with_new_item(o, str, p.new_item, p.new_item_slot)[:K]
        for p, o in zip(pools, orders, strict=True)
    ]


def _rank_inputs(
    models: EvalModels, ranker: Ranker, inputs: Inputs, variant: Variant, progress: bool
) -> list[list[str]]:
    """Each pool's candidate ids in the order of Ranker.combine's two passes."""
    two_pass = ranker.plan(False)
    reranks = "cross_encoder" not in variant.drops
    firsts = [
        plan.first_pass(two_pass, scores, reranks and bool(context_text(context)))
        for context, _, scores in inputs
    ]
    contexts = [context for context, _, _ in inputs]
    candidates = [cands for _, cands, _ in inputs]
    scored = _head_scores(
        models,
        contexts,
        candidates,
        [f.rows for f in firsts],
        f"ablation: {variant.name}",
        progress,
    )
    out = []
    for (_, cands, scores), first, ce in zip(inputs, firsts, scored, strict=True):
        fused = plan.final(two_pass, scores, first, ce)
        out.append([cands[i].item_id for i in plan.order(fused)])
    return out


def refitted_answers(
    validation: StageAnswers, relevant: dict[str, set[str]], stage: StageAnswers
) -> dict[str, dict[str, list[str]]]:
    """Each variant's top 10 per user of `stage` from a first pass fitted, as the build fits
    it, on the variant's `validation` lists (`relevant`: the validation users' items)."""
    out = {}
    for variant in VARIANTS:
        fitting = [
            FusionList(scores, np.array([i in relevant[u] for i in ids], np.float64))
            for u, (scores, ids) in validation.lists[variant.name].items()
            if ids
        ]
        first = fit_two_pass(fitting, None, ConvexFusion(), requests="validation users").first
        out[variant.name] = {
            u: [ids[i] for i in plan.order(first.fuse(scores))[:K]] if ids else []
            for u, (scores, ids) in stage.lists[variant.name].items()
        }
    return out


def _head_scores(
    models: EvalModels,
    contexts: Sequence[RankContext],
    candidates: Sequence[Sequence[Candidate]],
    heads: Sequence[np.ndarray],
    desc: str,
    progress: bool,
) -> list[np.ndarray]:
    """The serving cross-encoder's scores of each list's head rows (empty where none)."""
    todo = [i for i, rows in enumerate(heads) if rows.size]
    out = [np.zeros(0, np.float32) for _ in heads]
    if not todo:
        return out
    lists = [[candidates[i][r] for r in heads[i]] for i in todo]
    scores = score_lists(models.tuned, [contexts[i] for i in todo], lists, desc, progress)
    for i, values in zip(todo, scores, strict=True):
        out[i] = values
    return out


def table(
    relevant: dict[str, dict[str, set[str]]],
    served: dict[str, dict[str, dict[str, list[str]]]],
    refitted: dict[str, dict[str, list[str]]],
    draws: int = 1000,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per variant: NDCG@10 as served on each stage (`relevant` and `served` by stage
    name), and on test refitted; `full` / variant on test, both ways, with paired bootstrap
    intervals (users resampled). Users without history count as unanswered."""
    test = relevant["test"]
    ndcg = {
        (stage, name): per_query_ndcg(relevant[stage], runs)
        for stage, by_variant in served.items()
        for name, runs in by_variant.items()
    }
    refit = {name: per_query_ndcg(test, runs) for name, runs in refitted.items()}
    rows = []
    for variant in VARIANTS:
        row: dict[str, Any] = {"variant": variant.name, "means": variant.means}
        for stage in served:
            row[f"{stage} ndcg@10"] = round(float(ndcg[(stage, variant.name)].mean()), 4)
        row["test ndcg@10 refitted"] = round(float(refit[variant.name].mean()), 4)
        if variant.name != "full":
            row["test full / variant"] = paired_bootstrap_ratio(
                ndcg[("test", "full")], ndcg[("test", variant.name)], draws, seed
            )
            row["test full / variant refitted"] = paired_bootstrap_ratio(
                refit["full"], refit[variant.name], draws, seed
            )
        rows.append(row)
    return rows


def run_ablation(
    models: EvalModels,
    split: Split,
    pool: int,
    validation: tuple[dict[str, list[str]], dict[str, set[str]]],
    test: tuple[dict[str, list[str]], dict[str, set[str]]],
    progress: bool,
) -> dict[str, Any]:
    """The ablation table over (histories, relevant) of validation users and of test users."""
    stages = {
        "validation": Stage("validation", models.ranker_refitted_on(split.train), *validation),
        "test": Stage("test", models.ranker, *test),
    }
    results = {name: answers(models, stage, pool, progress) for name, stage in stages.items()}
    refitted = refitted_answers(results["validation"], validation[1], results["test"])
    return {
        # False: the bundle's plan answers recommendations from the first pass alone (the
        # build found the cross-encoder did not pay there), so dropping it changes nothing.
        "cross_encoder_in_plan": models.ranker.plan(False).cross_encoder_pays,
        "rows": table(
            {name: stage.relevant for name, stage in stages.items()},
            {name: result.served for name, result in results.items()},
            refitted,
        ),
    }
