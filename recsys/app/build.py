"""The offline bundle build: ingest → embeddings + index → CF → cross-encoder → fusion → publish."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from ranking_service.distill import DistillConfig
from ranking_service.train import RankerTrainConfig
from recsys.app.build_steps import STEPS, BuildState
from recsys.app.ingest import IngestReport, load_catalog, load_interactions, no_interactions
from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from recsys.core.errors import InvalidInput
from recsys.core.settings import default

if TYPE_CHECKING:
    from ranking_service.cf import Weighting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `recsys build` can be told; recorded in the manifest as the settings used."""

    catalog: Path
    # None (or a log whose rows are all searches): a search bundle, without CF.
    interactions: Path | None
    out: Path
    # Searches with the items relevant to each (JSON lines: {"query": ..., "item_ids": [...]}),
    # fine-tuned on and, a share held out, fitted on; None: only queries logged in interactions.
    queries: Path | None = None
    encoder: Path | None = None
    pooling: str = "mean"
    index_factory: str = "Flat"
    # None builds no cross-encoder (--no-ranker); ranking then fuses CF and retrieval.
    ranker: RankerTrainConfig | None = field(default_factory=RankerTrainConfig)
    # The smaller cross-encoder distilled from the fine-tuned one (None: none, --no-student).
    student: DistillConfig | None = field(default_factory=DistillConfig)
    # The int8 copies and the student even where fusion found the cross-encoder pays for no
    # kind of request (by default made only where it pays: serving would not run them).
    always_copies: bool = False
    device: str = "auto"
    strict: bool = False
    # ALS's hyper-parameters (ranking_service.cf.ALSParams); with cf_search, where the
    # validation search starts (recsys.offline.cf_search), and otherwise what CF trains with.
    cf_factors: int = 64
    cf_iterations: int = 15
    cf_regularization: float = 0.05
    cf_alpha: float = 2.0
    cf_weighting: Weighting = "weight"
    # Off by default: it raised validation but not test NDCG@10 where measured (docs/
    # architecture.md, "Why these thresholds"), so the built-in values stay what ships.
    cf_search: bool = False
    fusion_alpha: float = 0.7
    # The pool serving ranks by default: fusion is fitted and negatives are mined on it.
    candidate_pool: int = default("default_candidate_pool")
    cf_candidate_share: float = default("cf_candidate_share")
    # Validation: each user's most recent interactions (at most half of theirs) are held out to
    # fit fusion; held-out interactions weighing at least this count as relevant (None: all).
    holdout_per_user: int = 10
    relevant_min_weight: float | None = None
    # Held-out lists per request kind the rerank depth sweep and the second pass are fitted on
    # (the cross-encoder scores the first pass's top 50 of each, the build's main cost after
    # fine-tuning); the first pass is fitted on every held-out list.
    fusion_lists: int = 160
    # The cross-encoder's share of a request's time: the rerank depth is cut to what the
    # serving copy scores within it at the pairs/s measured in the build.
    rerank_budget_ms: float = 60.0
    seed: int = 0
    split: str | None = None  # set when built from an evaluation protocol's train split
    # The live version a retrain starts from: its embeddings of unchanged item texts are reused
    # (same encoder files only) and its fine-tuned cross-encoder is where fine-tuning starts.
    warm_from: Bundle | None = None
    # The shared catalog change log (retrieval's change_log_url): its changes up to its current
    # position are folded into the catalog, and serving replays only what comes after.
    change_log_url: str | None = None
    change_log_table: str = default("change_log_table")


@dataclass(frozen=True)
class BuildInputs:
    """Validated inputs, loaded before anything is written."""

    catalog: pd.DataFrame
    interactions: pd.DataFrame
    report: IngestReport
    # Searches and their relevant items (fine-tuned on; a share held out to fit search fusion).
    queries: Sequence[tuple[str, Sequence[str]]] = ()
    # Where the change log was read to ({"log_id", "position", "name"}), for the manifest.
    change_log: dict[str, Any] | None = None


def load_inputs(options: BuildOptions, catalog: pd.DataFrame | None = None) -> BuildInputs:
    """Reads and validates the catalog (unless given, as load_catalog returns it) with the change
    log's changes folded in (when set), interactions and queries (raises InvalidInput naming
    the file)."""
    catalog = load_catalog(options.catalog) if catalog is None else catalog
    change_log = None
    if options.change_log_url:
        catalog, change_log = _with_logged_changes(
            catalog, options.change_log_url, options.change_log_table
        )
    known = set(catalog["item_id"])
    if options.interactions is None:
        if options.queries is None:
            raise InvalidInput(
                "--interactions, --queries: give user interactions, searches, or both"
            )
        interactions, report = no_interactions(), IngestReport(0, 0, 0, ())
    else:
        interactions, report = load_interactions(
            options.interactions, known_item_ids=known, strict=options.strict
        )
    queries = [] if options.queries is None else load_queries(options.queries, known)
    if len(interactions) and (interactions["query"].str.strip() != "").all():
        # Only searches: a query log, not users' tastes. Its searches are the queries.
        logged = searches_of(interactions)
        log.info(
            "%s: every row is a search; its %d searches are fine-tuned and fitted on as queries",
            options.interactions,
            len(logged),
        )
        queries, interactions = [*queries, *logged], no_interactions()
    if interactions.empty:
        log.warning(
            "no user interactions: building a search bundle (CF skipped; recommendations come "
            "from content: retrieval's history vector)"
        )
    return BuildInputs(catalog, interactions, report, queries, change_log)


def searches_of(interactions: pd.DataFrame) -> list[tuple[str, tuple[str, ...]]]:
    """Each distinct query of a log with the items found for it, in first-seen order."""
    items: dict[str, dict[str, None]] = {}
    for query, item_id in zip(
        interactions["query"].str.strip(), interactions["item_id"], strict=True
    ):
        items.setdefault(query, {})[item_id] = None
    return [(query, tuple(found)) for query, found in items.items()]


def _with_logged_changes(
    catalog: pd.DataFrame, url: str, table: str
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The catalog with every change up to the log's head applied (online changes win over the
    file), and where the log was read to."""
    from recsys.app.ingest import catalog_items, items_to_frame
    from retrieval_service.changelog import ChangeLog
    from retrieval_service.durability import catalog_with_changes

    log_ = ChangeLog(url, table)
    try:
        changed = catalog_with_changes(catalog_items(catalog), log_)
    finally:
        log_.close()
    if changed.trimmed_through:
        log.warning(
            "change log %s is trimmed through position %d: the catalog given must already hold "
            "the changes up to there (a version built from the log does)",
            log_.name,
            changed.trimmed_through,
        )
    log.info(
        "change log %s: %d records through position %d folded into the catalog (%d items changed)",
        log_.name,
        changed.records,
        changed.position,
        changed.upserts + changed.deletes,
    )
    where = {"log_id": log_.log_id, "position": changed.position, "name": log_.name}
    return items_to_frame(changed.items), where


def load_queries(path: Path, known_item_ids: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Every record of a queries file (its `split` field is the evaluation protocol's and is
    not read here), items unknown to the catalog left out, queries left with none dropped."""
    from recsys.app.movielens import read_queries

    records = read_queries(path)
    queries = []
    for record in records:
        items = tuple(i for i in record.item_ids if i in known_item_ids)
        if items:
            queries.append((record.query, items))
    log.info("queries: %d of %d in %s name a catalog item", len(queries), len(records), path)
    return queries


def build_bundle(
    options: BuildOptions,
    inputs: BuildInputs | None = None,
    validation: pd.DataFrame | None = None,
    switch: bool = True,
) -> Bundle:
    """Builds a complete version under options.out and switches CURRENT to it only at the end
    (`switch` False: leaves it unpublished, for `recsys retrain`'s gate to judge).

    Fusion is learned on `validation` interactions (later than the training ones; by default
    each user's most recent ones, held out here) and, for searches, on held-out queries: those
    among the validation interactions and a share of the inputs' queries kept out of
    fine-tuning. The CF model served is refitted on every interaction once fusion is fitted.
    Each step of STEPS adds its manifest sections; its seconds are recorded under its name.
    """
    inputs = inputs or load_inputs(options)
    started = time.perf_counter()
    with staged_version(options.out) as stage:
        build = BuildState.start(options, inputs, validation, stage)
        sections: dict[str, Any] = {"cross_encoder": None}
        timings: dict[str, float] = {}
        for name, step in STEPS:
            t0 = time.perf_counter()
            section = step(build)
            if section is not None:
                sections |= section
                seconds = time.perf_counter() - t0
                timings[f"{name}_seconds"] = timings.get(f"{name}_seconds", 0.0) + seconds
        timings = {**sections.pop("timings", {}), **timings}
        timings["total_seconds"] = time.perf_counter() - started
        manifest = write_manifest(
            stage, {**_header(build), **sections, "timings": timings, "software": _software()}
        )
    version = manifest["version"]
    if switch:
        publish(options.out, version)
        log.info("bundle %s published under %s", version, options.out)
    else:
        log.info("bundle %s built under %s, not published", version, options.out)
    return Bundle.open(options.out, version)


def _header(build: BuildState) -> dict[str, Any]:
    """The manifest's sections that describe the build rather than what a step made."""
    everything = pd.concat([build.train, build.validation], ignore_index=True)
    return {
        "version": build.stage.name.removeprefix(".staging-"),
        "settings": _settings_record(build.options),
        "counts": {
            "items": len(build.inputs.catalog),
            "users": int(everything["user_id"].nunique()),
            "interactions": len(everything),
            "dropped_interactions": build.inputs.report.dropped_unknown_items,
            # A later retrain's gate scores only interactions after this one.
            "last_timestamp": int(everything["timestamp"].max()) if len(everything) else None,
        },
        "validation": build.validation_record,
        "warm_start": build.warm_start,
        **({"change_log": build.inputs.change_log} if build.inputs.change_log else {}),
    }


def _settings_record(options: BuildOptions) -> dict[str, Any]:
    record = asdict(replace(options, warm_from=None))
    if options.change_log_url:
        from recsys.core.urls import redacted

        record["change_log_url"] = redacted(options.change_log_url)  # no password in manifests
    record["warm_from"] = None if options.warm_from is None else options.warm_from.version
    return {k: str(v) if isinstance(v, Path) else v for k, v in record.items()}


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
