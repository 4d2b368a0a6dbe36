"""The offline bundle build: ingest → embeddings + index → CF → cross-encoder → fusion → publish."""

from __future__ import annotations

import logging
import platform
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ranking_service.train import RankerTrainConfig
from recsys.app.ingest import IngestReport, load_catalog, load_interactions
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from recsys.core.settings import default

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `recsys build` can be told; recorded in the manifest as the settings used."""

    catalog: Path
    interactions: Path
    out: Path
    encoder: Path | None = None
    pooling: str = "mean"
    index_factory: str = "Flat"
    # None builds no cross-encoder (--no-ranker); ranking then fuses CF and retrieval.
    ranker: RankerTrainConfig | None = field(default_factory=RankerTrainConfig)
    device: str = "auto"
    strict: bool = False
    cf_factors: int = 64
    fusion_alpha: float = 0.7
    # The pool serving ranks by default: fusion is fitted and negatives are mined on it.
    candidate_pool: int = default("default_candidate_pool")
    cf_candidate_share: float = default("cf_candidate_share")
    seed: int = 0
    split: str | None = None  # set when built from an evaluation protocol's train split


@dataclass(frozen=True)
class BuildInputs:
    """Validated inputs, loaded before anything is written."""

    catalog: pd.DataFrame
    interactions: pd.DataFrame
    report: IngestReport


def load_inputs(options: BuildOptions) -> BuildInputs:
    """Reads and validates the catalog and interactions (raises InvalidInput naming the file)."""
    catalog = load_catalog(options.catalog)
    interactions, report = load_interactions(
        options.interactions, known_item_ids=set(catalog["item_id"]), strict=options.strict
    )
    return BuildInputs(catalog, interactions, report)


def build_bundle(
    options: BuildOptions,
    inputs: BuildInputs | None = None,
    train_queries: Sequence[tuple[str, Sequence[str]]] = (),
    validation: pd.DataFrame | None = None,
) -> Bundle:
    """Builds a complete version under options.out and switches CURRENT to it only at the end.

    With `validation` interactions (later than the training ones), fusion is learned on them
    (and, for searches, on a share of `train_queries` kept out of fine-tuning); otherwise the
    convex default is stored.
    """
    # Imported here: the CLI starts fast and `bundle info` never loads torch.
    from ranking_service.cf import CFModel
    from ranking_service.fusion import ConvexFusion, save_fusion
    from retrieval_service.build import build_retrieval
    from retrieval_service.catalog import save_catalog
    from retrieval_service.encoder import default_encoder_dir

    inputs = inputs or load_inputs(options)
    encoder_dir = options.encoder or default_encoder_dir()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    with staged_version(options.out) as stage:
        save_catalog(inputs.catalog, stage / bundle_files.CATALOG)

        t0 = time.perf_counter()
        retrieval = build_retrieval(
            inputs.catalog,
            stage,
            encoder_dir=encoder_dir,
            pooling=options.pooling,  # type: ignore[arg-type]
            factory=options.index_factory,
            device=options.device,
        )
        timings["retrieval_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        log.info("training CF (ALS) on %d interactions", len(inputs.interactions))
        cf = CFModel.train(inputs.interactions, factors=options.cf_factors, seed=options.seed)
        cf_section = cf.save(stage / bundle_files.CF_DIR)
        timings["cf_seconds"] = time.perf_counter() - t0

        ranker_section: dict[str, Any] | None = None
        fusion_queries: list[tuple[str, Sequence[str]]] = []
        if validation is not None:
            train_queries, fusion_queries = hold_out_queries(train_queries, options.seed)
        if options.ranker is not None:
            t0 = time.perf_counter()
            ranker_section = _train_ranker(
                options, inputs, retrieval, cf, encoder_dir, stage, train_queries
            )
            timings["ranker_seconds"] = time.perf_counter() - t0

        fusion: Any = ConvexFusion(alpha=options.fusion_alpha)
        if validation is not None and options.ranker is not None:
            t0 = time.perf_counter()
            fusion = _fit_fusion(
                options, inputs, validation, fusion_queries, retrieval, cf, stage, fusion
            )
            timings["fusion_seconds"] = time.perf_counter() - t0
        save_fusion(fusion, stage / bundle_files.FUSION)
        timings["total_seconds"] = time.perf_counter() - started

        manifest = write_manifest(
            stage,
            {
                "version": stage.name.removeprefix(".staging-"),
                "settings": _settings_record(options),
                "counts": {
                    "items": len(inputs.catalog),
                    "users": int(inputs.interactions["user_id"].nunique()),
                    "interactions": len(inputs.interactions),
                    "dropped_interactions": inputs.report.dropped_unknown_items,
                },
                **retrieval.manifest,
                "cf": cf_section,
                "cross_encoder": ranker_section,
                "fusion": fusion.to_dict(),
                "timings": {**retrieval.manifest.get("timings", {}), **timings},
                "software": _software(),
            },
        )
    version = manifest["version"]
    publish(options.out, version)
    log.info("bundle %s published under %s", version, options.out)
    return Bundle.open(options.out, version)


def _staged_retriever(inputs: BuildInputs, retrieval: Any, stage: Path) -> Any:
    """A Retriever over the version being built (offline: no journal)."""
    from recsys.app.ingest import catalog_items
    from retrieval_service.catalog import ItemStore
    from retrieval_service.retriever import Retriever

    vectors = np.load(stage / bundle_files.EMBEDDINGS)
    store = ItemStore(catalog_items(inputs.catalog), vectors)
    return Retriever(retrieval.encoder, retrieval.index, store, None, "staging")


def _offline_ranker(cf: Any, fusion: Any) -> Any:
    """A Ranker over the version being built, without a cross-encoder (CF recall and scores)."""
    from ranking_service.ranker import Ranker

    return Ranker(cf, fusion, None, {})


def _pools(
    options: BuildOptions, requests: Sequence[Any], retriever: Any, ranker: Any, desc: str | None
) -> list[Any]:
    """The candidate pool serving would rank for each request (gateway.candidates)."""
    from gateway.candidates import PoolPolicy
    from recsys.app.local import gather_pools

    policy = PoolPolicy(cf_share=options.cf_candidate_share)
    return gather_pools(requests, retriever, ranker, policy, desc)


def _train_ranker(
    options: BuildOptions,
    inputs: BuildInputs,
    retrieval: Any,
    cf: Any,
    encoder_dir: Path,
    stage: Path,
    train_queries: Sequence[tuple[str, Sequence[str]]],
) -> dict[str, Any]:
    from ranking_service.fusion import ConvexFusion
    from ranking_service.train import Example, train_cross_encoder
    from recsys.app.local import pool_request

    retriever = _staged_retriever(inputs, retrieval, stage)
    ranker = _offline_ranker(cf, ConvexFusion(alpha=options.fusion_alpha))

    def negatives(examples: Sequence[Example]) -> list[list[str]]:
        """The pool serving would rank for each example's query and history."""
        requests = [
            pool_request(options.candidate_pool, query=e.query, history=e.history) for e in examples
        ]
        pools = _pools(options, requests, retriever, ranker, desc=None)
        return [[p.item_id for p in pool.items] for pool in pools]

    assert options.ranker is not None
    config = replace(options.ranker, device=options.device, seed=options.seed)
    return train_cross_encoder(
        base_dir=encoder_dir,
        catalog=inputs.catalog,
        interactions=inputs.interactions,
        negatives=negatives,
        out_dir=stage / bundle_files.CROSS_ENCODER_DIR,
        config=config,
        train_queries=train_queries,
    )


FUSION_USERS = 200  # validation users whose lists fit the recommendation fusion
FUSION_QUERY_SHARE = 0.3  # of the training queries, kept out of fine-tuning to fit search fusion


def hold_out_queries(
    queries: Sequence[tuple[str, Sequence[str]]], seed: int
) -> tuple[list[tuple[str, Sequence[str]]], list[tuple[str, Sequence[str]]]]:
    """(queries to fine-tune on, queries to fit the search fusion on), disjoint.

    The fusion must see the cross-encoder on queries it was not trained on, or it would learn
    to trust it more than it deserves.
    """
    shuffled = sorted(queries, key=lambda q: q[0])
    random.Random(seed).shuffle(shuffled)
    held = round(len(shuffled) * FUSION_QUERY_SHARE)
    return shuffled[held:], shuffled[:held]


def _fit_fusion(
    options: BuildOptions,
    inputs: BuildInputs,
    validation: pd.DataFrame,
    queries: Sequence[tuple[str, Sequence[str]]],
    retrieval: Any,
    cf: Any,
    stage: Path,
    default: Any,
) -> Any:
    """Learns one fusion for recommendations (validation users: train history → the pool the
    gateway would gather → stage scores) and one for searches (held-out training queries)."""
    from ranking_service.cross_encoder import CrossEncoderScorer
    from ranking_service.fusion import ContextFusion
    from ranking_service.train import fit_fusion

    assert options.ranker is not None
    retriever = _staged_retriever(inputs, retrieval, stage)
    scorer = CrossEncoderScorer.load(
        stage / bundle_files.CROSS_ENCODER_DIR, options.device, options.ranker.max_length
    )
    ranker = _offline_ranker(cf, default)
    history_lists = _history_lists(options, inputs, validation, retriever, ranker, scorer)
    query_lists = _query_lists(options, queries, retriever, ranker, scorer)
    if not history_lists:
        log.warning("no validation list has a relevant candidate; keeping %s", default.to_dict())
        return default
    log.info(
        "fitting fusion on %d validation users and %d held-out queries",
        len(history_lists),
        len(query_lists),
    )
    meta = {
        "replaces": default.to_dict(),
        "pool": options.candidate_pool,
        "cf_share": options.cf_candidate_share,
    }
    history = fit_fusion(history_lists, requests="validation users", **meta)
    query = (
        fit_fusion(query_lists, requests="held-out train queries", **meta)
        if query_lists
        else default
    )
    return ContextFusion(query=query, history=history)


def _history_lists(
    options: BuildOptions,
    inputs: BuildInputs,
    validation: pd.DataFrame,
    retriever: Any,
    ranker: Any,
    scorer: Any,
) -> list[Any]:
    """Validation users' lists: train history → the pool serving would gather → was each
    candidate among the user's validation items?"""
    from ranking_service.train import EXAMPLE_HISTORY, FusionList
    from recsys.app.local import pool_request
    from recsys.app.splits import histories, relevant_items

    seen = histories(inputs.interactions)
    relevant = relevant_items(validation)
    users = sorted(u for u in relevant if seen.get(u))
    users = random.Random(options.seed).sample(users, min(FUSION_USERS, len(users)))
    requests = [
        pool_request(options.candidate_pool, history=seen[u][:EXAMPLE_HISTORY], exclude=seen[u])
        for u in users
    ]
    pools = _pools(options, requests, retriever, ranker, desc="fusion: validation users")
    lists = []
    for user, pool in zip(users, pools, strict=True):
        candidates = pool.candidates()
        labels = np.array([c.item_id in relevant[user] for c in candidates], dtype=np.float64)
        if labels.any():  # a list without a positive teaches the ranking nothing
            scores = _stage_scores(ranker, scorer, pool.context(), candidates)
            lists.append(FusionList(scores, labels))
    return lists


def _query_lists(
    options: BuildOptions,
    queries: Sequence[tuple[str, Sequence[str]]],
    retriever: Any,
    ranker: Any,
    scorer: Any,
) -> list[Any]:
    """Held-out training queries' lists: the pool serving would gather for the query text."""
    from ranking_service.train import FusionList
    from recsys.app.local import pool_request

    requests = [pool_request(options.candidate_pool, query=query) for query, _ in queries]
    pools = _pools(options, requests, retriever, ranker, desc="fusion: held-out queries")
    lists = []
    for (_, relevant), pool in zip(queries, pools, strict=True):
        candidates = pool.candidates()
        labels = np.array([c.item_id in set(relevant) for c in candidates], dtype=np.float64)
        if labels.any():
            scores = _stage_scores(ranker, scorer, pool.context(), candidates)
            lists.append(FusionList(scores, labels))
    return lists


def _stage_scores(ranker: Any, scorer: Any, context: Any, candidates: Sequence[Any]) -> Any:
    from ranking_service.cross_encoder import build_context

    text = build_context(context.query, [h.text for h in context.history])
    ce = scorer.score([(text, c.text) for c in candidates])
    stages, _ = ranker.stage_scores(context, candidates, ce)
    return stages


def _settings_record(options: BuildOptions) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(options).items()}


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions of the named distributions; absent ones are left out."""
    versions = {}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _software() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        **package_versions(
            ("recsys", "torch", "transformers", "sentence-transformers", "faiss-cpu", "implicit")
        ),
    }
