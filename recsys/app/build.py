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
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ranking_service.distill import DistillConfig
from ranking_service.train import RankerTrainConfig
from recsys.app.ingest import IngestReport, load_catalog, load_interactions
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle, publish, staged_version, write_manifest
from recsys.core.settings import default

if TYPE_CHECKING:
    from ranking_service.cf import ALSParams, Weighting

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOptions:
    """Everything `recsys build` can be told; recorded in the manifest as the settings used."""

    catalog: Path
    interactions: Path
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
    device: str = "auto"
    strict: bool = False
    # ALS's hyper-parameters (ranking_service.cf.ALSParams); with cf_search, where the
    # validation search starts (recsys.app.cf_search), and otherwise what CF trains with.
    cf_factors: int = 64
    cf_iterations: int = 15
    cf_regularization: float = 0.05
    cf_alpha: float = 2.0
    cf_weighting: Weighting = "weight"
    # Off by default: on MovieLens the search raised CF's validation NDCG@10 by 11% but not its
    # test figure (0.0669 → 0.0646, inside the noise), so the built-in values stay what ships.
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
    interactions, report = load_interactions(
        options.interactions, known_item_ids=known, strict=options.strict
    )
    queries = () if options.queries is None else load_queries(options.queries, known)
    return BuildInputs(catalog, interactions, report, queries, change_log)


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
    """
    # Imported here: the CLI starts fast and `bundle info` never loads torch.
    from ranking_service.cf import CFModel
    from ranking_service.fusion import ConvexFusion, save_fusion
    from retrieval_service.build import build_retrieval
    from retrieval_service.catalog import save_catalog
    from retrieval_service.encoder import default_encoder_dir

    inputs = inputs or load_inputs(options)
    train, validation, validation_record = _validation(options, inputs.interactions, validation)
    everything = pd.concat([train, validation], ignore_index=True)
    fitting = replace(inputs, interactions=train)
    encoder_dir = options.encoder or default_encoder_dir()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    known, warm_start = _warm_start(options, encoder_dir)
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
            known=known,
        )
        timings["retrieval_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        cf_params, cf_search = _cf_params(options, train, validation)
        timings["cf_search_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        log.info("training CF (ALS) on %d interactions before the validation ones", len(train))
        cf = CFModel.train(train, seed=options.seed, **cf_params.kwargs())
        timings["cf_seconds"] = time.perf_counter() - t0

        # The version being built, served in this process: pools come from it as from serving.
        retriever = _staged_retriever(fitting, retrieval, stage)
        offline = _offline_ranker(cf, ConvexFusion(alpha=options.fusion_alpha), stage)
        ranker_section: dict[str, Any] | None = None
        train_queries, fusion_queries = hold_out_queries(inputs.queries, options.seed)
        # The cross-encoder reads a search only where it was fine-tuned on some.
        searched = bool(train_queries) or bool(_logged_queries(fitting.interactions))
        if options.ranker is not None:
            t0 = time.perf_counter()
            ranker_section = _train_ranker(
                options, fitting, retriever, offline, encoder_dir, stage, train_queries
            )
            timings["ranker_seconds"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            contexts = _train_side_contexts(options)
            pairs = _train_side_pairs(options, fitting, retriever, offline, train_queries, contexts)
            ranker_section |= _cheaper_copies(options, stage, encoder_dir, pairs)
            timings["copies_seconds"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        fusion_queries += validation_queries(validation)
        student = (ranker_section or {}).get("student", {})
        fusion, parity = _fit_fusion(
            options,
            fitting,
            validation,
            fusion_queries,
            retriever,
            offline,
            stage,
            searched,
            train_queries,
            student.get("held_out", {}).get("spearman"),
        )
        save_fusion(fusion, stage / bundle_files.FUSION)
        if ranker_section is not None:
            ranker_section |= parity
        timings["fusion_seconds"] = time.perf_counter() - t0

        if len(validation):
            t0 = time.perf_counter()
            log.info("refitting CF on all %d interactions", len(everything))
            cf = CFModel.train(everything, seed=options.seed, **cf_params.kwargs())
            timings["cf_seconds"] += time.perf_counter() - t0
        cf_section = {**cf.save(stage / bundle_files.CF_DIR), "search": cf_search}
        timings["total_seconds"] = time.perf_counter() - started

        manifest = write_manifest(
            stage,
            {
                "version": stage.name.removeprefix(".staging-"),
                "settings": _settings_record(options),
                "counts": {
                    "items": len(inputs.catalog),
                    "users": int(everything["user_id"].nunique()),
                    "interactions": len(everything),
                    "dropped_interactions": inputs.report.dropped_unknown_items,
                    # A later retrain's gate scores only interactions after this one.
                    "last_timestamp": int(everything["timestamp"].max())
                    if len(everything)
                    else None,
                },
                "validation": validation_record,
                "warm_start": warm_start,
                **({"change_log": inputs.change_log} if inputs.change_log else {}),
                **retrieval.manifest,
                "cf": cf_section,
                "cross_encoder": ranker_section,
                "fusion": fusion.to_dict(),
                "timings": {**retrieval.manifest.get("timings", {}), **timings},
                "software": _software(),
            },
        )
    version = manifest["version"]
    if switch:
        publish(options.out, version)
        log.info("bundle %s published under %s", version, options.out)
    else:
        log.info("bundle %s built under %s, not published", version, options.out)
    return Bundle.open(options.out, version)


def _warm_start(
    options: BuildOptions, encoder_dir: Path
) -> tuple[dict[str, np.ndarray], dict[str, Any] | None]:
    """(item text -> the live version's vector, the manifest's warm-start record): vectors only
    where the live version was built with byte-identical encoder files and the same pooling."""
    from retrieval_service.build import catalog_texts, encoder_checksums

    live = options.warm_from
    if live is None:
        return {}, None
    record: dict[str, Any] = {"from": live.version}
    prefix = bundle_files.ENCODER_DIR + "/"
    live_files = {
        name.removeprefix(prefix): digest
        for name, digest in live.manifest.get("files", {}).items()
        if name.startswith(prefix)
    }
    ours = encoder_checksums(encoder_dir)
    if live.manifest.get("encoder", {}).get("pooling") != options.pooling:
        record["embeddings"] = f"not reused: {live.version} pools with another method"
    elif any(live_files.get(name) != digest for name, digest in ours.items()):
        record["embeddings"] = f"not reused: {encoder_dir} differs from {live.version}'s encoder"
    else:
        texts = catalog_texts(pd.read_parquet(live.file(bundle_files.CATALOG)))
        vectors = np.load(live.file(bundle_files.EMBEDDINGS))
        record["embeddings"] = f"reused from {live.version} where the item text is unchanged"
        return dict(zip(texts, vectors, strict=True)), record
    log.warning("warm start from %s: embeddings %s", live.version, record["embeddings"])
    return {}, record


def _validation(
    options: BuildOptions, interactions: pd.DataFrame, given: pd.DataFrame | None
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, Any]]:
    """(interactions to train on, validation interactions, the manifest's record of them)."""
    from recsys.app.splits import hold_out_recent

    if given is not None:
        train, validation, source = interactions, given, "given (the evaluation protocol's)"
    else:
        train, validation = hold_out_recent(interactions, options.holdout_per_user)
        source = f"each user's most recent {options.holdout_per_user} (at most half)"
    log.info(
        "validation: %d interactions of %d users held out to fit fusion (%s)",
        len(validation),
        validation["user_id"].nunique() if len(validation) else 0,
        source,
    )
    record = {
        "source": source,
        "interactions": len(validation),
        "users": int(validation["user_id"].nunique()) if len(validation) else 0,
        "relevant_min_weight": options.relevant_min_weight,
    }
    return train, validation, record


def _cf_start(options: BuildOptions) -> ALSParams:
    """The ALS values the options give."""
    from ranking_service.cf import ALSParams

    return ALSParams(
        factors=options.cf_factors,
        iterations=options.cf_iterations,
        regularization=options.cf_regularization,
        alpha=options.cf_alpha,
        weighting=options.cf_weighting,
    )


def _cf_params(
    options: BuildOptions, train: pd.DataFrame, validation: pd.DataFrame
) -> tuple[ALSParams, dict[str, Any]]:
    """(the ALS values CF trains with, the manifest's record of how they were chosen): chosen
    by the validation search from the options' values, or those values as they are."""
    from ranking_service.cf import ALSParams
    from recsys.app.cf_search import search_cf

    start = _cf_start(options)
    if options.cf_search:
        found = search_cf(train, validation, start, options.seed, options.relevant_min_weight)
        return found.params, found.record
    live = options.warm_from
    if live is not None and ALSParams.of(live.manifest.get("cf", {})) == start:
        reason = f"off: {live.version}'s values, reused"
    else:
        reason = "off: trained with the values given"
    log.info("CF search %s", reason)
    return start, {"skipped": reason}


def validation_queries(validation: pd.DataFrame) -> list[tuple[str, Sequence[str]]]:
    """Held-out searches: each query text of the validation interactions with its items."""
    if "query" not in validation or not len(validation):
        return []
    searched = validation[validation["query"].astype(str).str.strip() != ""]
    return [
        (str(query).strip(), sorted({str(i) for i in group["item_id"]}))
        for query, group in searched.groupby(searched["query"].astype(str).str.strip(), sort=True)
    ]


def _staged_retriever(inputs: BuildInputs, retrieval: Any, stage: Path) -> Any:
    """A Retriever over the version being built (offline: no journal)."""
    from recsys.app.ingest import catalog_items
    from retrieval_service.backends import FaissCatalog
    from retrieval_service.catalog import ItemStore
    from retrieval_service.retriever import Retriever

    vectors = np.load(stage / bundle_files.EMBEDDINGS)
    store = ItemStore(catalog_items(inputs.catalog), vectors)
    return Retriever(retrieval.encoder, FaissCatalog(store, retrieval.index), "staging")


def _offline_ranker(cf: Any, fusion: Any, stage: Path) -> Any:
    """A Ranker over the version being built, without a cross-encoder (CF recall and scores,
    content similarities)."""
    from ranking_service.content import ItemVectors
    from ranking_service.ranker import Ranker

    return Ranker(cf, fusion, None, {}, content=ItemVectors.load(stage))


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
    retriever: Any,
    ranker: Any,
    encoder_dir: Path,
    stage: Path,
    train_queries: Sequence[tuple[str, Sequence[str]]],
) -> dict[str, Any]:
    from ranking_service.train import Example, train_cross_encoder
    from recsys.app.local import pool_request

    def negatives(examples: Sequence[Example]) -> list[list[str]]:
        """The pool serving would rank for each example's query and history."""
        requests = [
            pool_request(options.candidate_pool, query=e.query, history=e.history) for e in examples
        ]
        pools = _pools(options, requests, retriever, ranker, desc=None)
        return [[p.item_id for p in pool.items] for pool in pools]

    assert options.ranker is not None
    config = replace(options.ranker, device=options.device, seed=options.seed)
    live = options.warm_from
    warm = None
    if live is not None and live.manifest.get("cross_encoder"):
        warm = live.file(bundle_files.CROSS_ENCODER_DIR)
    return train_cross_encoder(
        base_dir=encoder_dir,
        catalog=inputs.catalog,
        interactions=inputs.interactions,
        negatives=negatives,
        out_dir=stage / bundle_files.CROSS_ENCODER_DIR,
        config=config,
        train_queries=train_queries,
        warm_start=warm,
    )


TRAIN_SIDE_CONTEXTS = 300  # at most, training contexts whose pools the student learns from
PAIRS_PER_CONTEXT = 30  # of each pool, in the order serving gathers it


def _train_side_contexts(options: BuildOptions) -> int:
    """Contexts enough for one pass of the student's training (or int8 calibration alone)."""
    from ranking_service.quantized import CALIBRATION_PAIRS

    student = options.student
    pairs = CALIBRATION_PAIRS if student is None else student.steps * student.batch_size
    return min(TRAIN_SIDE_CONTEXTS, max(1, -(-pairs // PAIRS_PER_CONTEXT)))


def _train_side_pairs(
    options: BuildOptions,
    inputs: BuildInputs,
    retriever: Any,
    ranker: Any,
    train_queries: Sequence[tuple[str, Sequence[str]]],
    contexts: int,
) -> list[tuple[str, str]]:
    """Serving-like (context, candidate) pairs from training data only (never validation):
    about `contexts` contexts, three in four users' histories cut at a random earlier point and
    one in four training queries, each with the first PAIRS_PER_CONTEXT candidates of the pool
    serving would gather."""
    from ranking_service.cross_encoder import build_context
    from ranking_service.train import EXAMPLE_HISTORY
    from recsys.app.local import pool_request
    from recsys.app.splits import histories

    rng = random.Random(options.seed)
    seen = histories(inputs.interactions)
    users = sorted(u for u, items in seen.items() if len(items) >= 2)
    requests = []
    for user in rng.sample(users, min(contexts - contexts // 4, len(users))):
        earlier = seen[user][rng.randrange(1, len(seen[user])) :]
        requests.append(
            pool_request(options.candidate_pool, history=earlier[:EXAMPLE_HISTORY], exclude=earlier)
        )
    texts = sorted({*_logged_queries(inputs.interactions), *(q for q, _ in train_queries)})
    for query in rng.sample(texts, min(max(contexts // 4, 1), len(texts))):
        requests.append(pool_request(options.candidate_pool, query=query))
    pairs: list[tuple[str, str]] = []
    for pool in _pools(options, requests, retriever, ranker, desc="student: training contexts"):
        context = pool.context()
        text = build_context(context.query, [h.text for h in context.history if h.text])
        if text:
            pairs.extend((text, c.text) for c in pool.candidates()[:PAIRS_PER_CONTEXT])
    return pairs


def _logged_queries(interactions: pd.DataFrame) -> set[str]:
    """The distinct non-empty query texts of an interaction log."""
    logged = interactions.get("query", pd.Series(dtype=str)).astype(str).str.strip()
    return set(logged[logged != ""])


def _cheaper_copies(
    options: BuildOptions, stage: Path, encoder_dir: Path, pairs: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    """The student distilled from the fine-tuned cross-encoder, and int8 copies of both, all
    from training-side pairs (int8 calibration only reads them for activation ranges)."""
    from ranking_service.copies import DIRS
    from ranking_service.distill import distill
    from ranking_service.quantized import export_int8

    assert options.ranker is not None
    max_length = options.ranker.max_length
    teacher = stage / bundle_files.CROSS_ENCODER_DIR
    out: dict[str, Any] = {}
    out["int8"] = export_int8(teacher, stage / DIRS["int8"], max_length, calibration_pairs=pairs)
    if options.student is not None:
        config = replace(
            options.student, device=options.device, seed=options.seed, max_length=max_length
        )
        student = stage / DIRS["student"]
        out["student"] = distill(teacher, encoder_dir, pairs, student, config)
        out["student_int8"] = export_int8(
            student, stage / DIRS["student_int8"], max_length, calibration_pairs=pairs
        )
    return out


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
    retriever: Any,
    ranker: Any,
    stage: Path,
    searched: bool,
    tuned_queries: Sequence[tuple[str, Sequence[str]]] = (),
    student_agreement: float | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Two passes for recommendations (validation users: train history → the pool the gateway
    would gather → stage scores) and two for searches (held-out queries), each falling back to
    the convex mix where too few lists have a relevant candidate; with a cross-encoder, also
    the record of which of its copies serves, and rerank depths cut to its time budget.
    Searches never use a cross-encoder that was not fine-tuned on any (`searched`); their first
    pass, which never reads it, is fitted on the `tuned_queries` it was fine-tuned on as well.

    Measured on MovieLens tags: fitted on the 13 held-out lists with a relevant candidate, the
    search first pass scored test NDCG@10 0.0787 ± 0.0059 (s.d. over 50 bootstrap refits); on
    those plus the 37 of the fine-tuning queries, 0.0833 ± 0.0010."""
    from ranking_service.cross_encoder import CrossEncoderScorer
    from ranking_service.fusion import ContextFusion, ConvexFusion
    from ranking_service.fusion_fit import fit_two_pass

    convex = ConvexFusion(alpha=options.fusion_alpha)
    history_lists = _history_lists(options, inputs, validation, retriever, ranker)
    query_lists = _query_lists(options, queries, retriever, ranker)
    tuned_lists = _query_lists(options, tuned_queries, retriever, ranker, "fusion: tuned queries")
    score_pairs = None
    if options.ranker is not None:
        scorer = CrossEncoderScorer.load(
            stage / bundle_files.CROSS_ENCODER_DIR, options.device, options.ranker.max_length
        )
        # Remembered: the copies are compared on the very pairs the sweep scored.
        score_pairs = _Remembered(scorer.score)
    meta: dict[str, Any] = {"pool": options.candidate_pool, "cf_share": options.cf_candidate_share}
    query_meta = dict(meta)
    if not searched:
        # With no second pass, searches keep the first pass (the fallback: retrieval's order).
        query_meta["cross_encoder"] = "skipped: never fine-tuned on a query"
        log.warning("fusion for searches: the data has no queries; the cross-encoder is skipped")
    fitted = {
        "history": fit_two_pass(
            history_lists,
            score_pairs,
            convex,
            requests="validation users",
            sweep_lists=options.fusion_lists,
            **meta,
        ),
        "query": fit_two_pass(
            query_lists,
            score_pairs if searched else None,
            convex,
            requests="held-out queries",
            sweep_lists=options.fusion_lists,
            first_lists=query_lists + tuned_lists,
            **query_meta,
        ),
    }
    if score_pairs is None:
        return ContextFusion(**fitted), {}
    lists = {"history": history_lists, "query": query_lists}
    chosen = _choose_copy(options, stage, score_pairs, fitted, lists, student_agreement)
    fitted = {
        kind: _within_budget(options, kind, two_pass, lists[kind], score_pairs, chosen)
        for kind, two_pass in fitted.items()
    }
    return ContextFusion(**fitted), chosen


def _within_budget(
    options: BuildOptions,
    kind: str,
    two_pass: Any,
    lists: list[Any],
    score_pairs: Any,
    chosen: dict[str, Any],
) -> Any:
    """`two_pass` with its rerank depth cut to options.rerank_budget_ms at the speed of the
    copy that serves (measured on this kind's held-out pairs)."""
    from ranking_service.fusion_fit import sweep_sample, within_budget

    rows = chosen["parity"].get(kind)
    if rows is None:
        return two_pass
    speed = rows[chosen["serving_copy"]]["pairs_per_s"]
    sample = sweep_sample(lists, options.fusion_lists)
    return within_budget(two_pass, sample, score_pairs, speed, options.rerank_budget_ms)


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


INT8_TOLERANCE = 0.01  # an int8 copy serves only within 1% of its fp32 model's NDCG@10
STUDENT_KEEPS = 0.97  # the student serves only with at least 97% of the teacher's NDCG@10
STUDENT_MIN_SPEARMAN = 0.9  # ... and its held-out scores' rank correlation with the teacher's


def _choose_copy(
    options: BuildOptions,
    stage: Path,
    fp32: _Remembered,
    fitted: dict[str, Any],
    held_out: dict[str, list[Any]],
    student_agreement: float | None,
) -> dict[str, Any]:
    """Compares every copy on the sweep's held-out lists (the two passes as fitted, each copy
    reranking the head) and picks the fastest that keeps the teacher's NDCG@10 for every
    kind: int8 within INT8_TOLERANCE of its fp32 model, the student within STUDENT_KEEPS (and
    with a held-out Spearman of at least STUDENT_MIN_SPEARMAN with the teacher)."""
    from ranking_service.copies import DIRS, load_copy
    from ranking_service.fusion_fit import sweep_sample, two_pass_ndcg

    assert options.ranker is not None
    copies: dict[str, Any] = {"fp32": fp32}
    for name in ("int8", "student", "student_int8"):
        if (stage / DIRS[name]).is_dir():
            copies[name] = load_copy(name, stage, options.ranker.max_length, "cpu").score
    parity: dict[str, Any] = {}
    for kind, two_pass in fitted.items():
        lists = sweep_sample(held_out[kind], options.fusion_lists)
        if two_pass.second is None or not lists:
            continue
        rows = {}
        for name, score in copies.items():
            value, pairs_per_s = two_pass_ndcg(two_pass, lists, score)
            rows[name] = {"ndcg@10": round(value, 4), "pairs_per_s": round(pairs_per_s, 1)}
        # fp32 answered from memory: its speed is the sweep's, timed afresh where none ran.
        rows["fp32"]["pairs_per_s"] = two_pass.fitted_on.get(
            "cross_encoder_pairs_per_s"
        ) or _fp32_speed(stage, options.ranker.max_length, lists)
        parity[kind] = rows
    # Two-pass NDCG moves little with the head's order, so the student must also agree with
    # the teacher on held-out training contexts before it may serve.
    follows = student_agreement is not None and student_agreement >= STUDENT_MIN_SPEARMAN
    allowed = [
        name
        for name in copies
        if parity and _keeps(name, parity) and (follows or not name.startswith("student"))
    ]
    speed = {name: min(rows[name]["pairs_per_s"] for rows in parity.values()) for name in allowed}
    serving = max(allowed, key=lambda name: speed[name]) if allowed else "fp32"
    log.info(
        "cross-encoder copies on held-out lists: %s -> serving %s",
        "; ".join(
            f"{kind}: "
            + ", ".join(
                f"{n} {r['ndcg@10']:.4f} at {r['pairs_per_s']:.0f} pairs/s" for n, r in rows.items()
            )
            for kind, rows in parity.items()
        )
        or "no held-out list to compare on",
        serving,
    )
    return {"parity": parity, "serving_copy": serving}


def _fp32_speed(stage: Path, max_length: int, lists: Sequence[Any], pairs: int = 200) -> float:
    """Pairs/s of the fine-tuned model on up to `pairs` of the held-out lists' pairs."""
    from ranking_service.cross_encoder import CrossEncoderScorer

    sample = [(f.context, t) for f in lists for t in f.texts][:pairs]
    scorer = CrossEncoderScorer.load(stage / bundle_files.CROSS_ENCODER_DIR, "cpu", max_length)
    started = time.perf_counter()
    scorer.score(sample)
    return round(len(sample) / max(time.perf_counter() - started, 1e-9), 1)


def _keeps(name: str, parity: dict[str, Any]) -> bool:
    """Whether copy `name` keeps enough of the teacher's NDCG@10 on every kind."""
    for rows in parity.values():
        teacher = rows["fp32"]["ndcg@10"]
        if name in ("int8", "student_int8"):
            model = rows["fp32" if name == "int8" else "student"]["ndcg@10"]
            if rows[name]["ndcg@10"] < (1 - INT8_TOLERANCE) * model:
                return False
        if name.startswith("student") and rows[name]["ndcg@10"] < STUDENT_KEEPS * teacher:
            return False
    return True


def _history_lists(
    options: BuildOptions,
    inputs: BuildInputs,
    validation: pd.DataFrame,
    retriever: Any,
    ranker: Any,
) -> list[Any]:
    """Every validation user's list, in a seeded random order: train history → the pool
    serving would gather → was each candidate among the user's validation items?"""
    from ranking_service.train import EXAMPLE_HISTORY
    from recsys.app.local import pool_request
    from recsys.app.splits import histories, relevant_items

    seen = histories(inputs.interactions)
    least = options.relevant_min_weight
    relevant = relevant_items(validation, -np.inf if least is None else least)
    users = sorted(u for u in relevant if seen.get(u))
    random.Random(options.seed).shuffle(users)
    requests = [
        pool_request(options.candidate_pool, history=seen[u][:EXAMPLE_HISTORY], exclude=seen[u])
        for u in users
    ]
    pools = _pools(options, requests, retriever, ranker, desc="fusion: validation users")
    return [_fusion_list(ranker, pool, relevant[u]) for u, pool in zip(users, pools, strict=True)]


def _query_lists(
    options: BuildOptions,
    queries: Sequence[tuple[str, Sequence[str]]],
    retriever: Any,
    ranker: Any,
    desc: str = "fusion: held-out queries",
) -> list[Any]:
    """Every query's list, in a seeded random order: the pool serving would gather for the
    query text."""
    from recsys.app.local import pool_request

    queries = list(queries)
    random.Random(options.seed).shuffle(queries)
    requests = [pool_request(options.candidate_pool, query=query) for query, _ in queries]
    pools = _pools(options, requests, retriever, ranker, desc=desc)
    return [
        _fusion_list(ranker, pool, set(relevant))
        for (_, relevant), pool in zip(queries, pools, strict=True)
    ]


def _fusion_list(ranker: Any, pool: Any, relevant: set[str]) -> Any:
    """One pool as fusion reads it: stage scores, labels and the cross-encoder's texts."""
    from ranking_service.cross_encoder import build_context
    from ranking_service.fusion_fit import FusionList

    context, candidates = pool.context(), pool.candidates()
    stages, _ = ranker.stage_scores(context, candidates, None)
    labels = np.array([c.item_id in relevant for c in candidates], dtype=np.float64)
    text = build_context(context.query, [h.text for h in context.history if h.text])
    return FusionList(stages, labels, text, tuple(c.text for c in candidates))


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
