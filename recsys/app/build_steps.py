"""The steps of `recsys build` (recsys.app.build.build_bundle runs them in order): retrieval,
the CF search, CF and the text sequence model, the cross-encoder, fusion's passes, the
cross-encoder's cheaper copies where it pays, fusion as it serves, CF refitted on everything.
Each returns the manifest sections it adds (None: skipped), and `BuildState` carries what they
share.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.core import bundle as bundle_files

if TYPE_CHECKING:
    from ranking_service.cf import ALSParams
    from ranking_service.content import ItemVectors
    from ranking_service.text_sequence import TextSequence
    from recsys.app.build import BuildInputs, BuildOptions
    from recsys.offline.fitting import FittedPasses, FittingSettings
    from recsys.offline.local import Pools

log = logging.getLogger(__name__)


@dataclass
class BuildState:
    """What the steps of one build share: its options and inputs, the split, the staging
    directory, and what earlier steps made."""

    options: BuildOptions
    inputs: BuildInputs
    train: pd.DataFrame
    validation: pd.DataFrame
    validation_record: dict[str, Any]
    stage: Path
    encoder_dir: Path
    known: dict[str, np.ndarray]  # the live version's vectors by item text (warm start)
    warm_start: dict[str, Any] | None
    train_queries: list[Any]
    fusion_queries: list[Any]
    retrieval: Any = None
    cf_params: ALSParams | None = None
    cf_search: dict[str, Any] | None = None
    item_item_search: Any = None  # recsys.offline.cf_search.ItemItemSearch
    fitted: FittedPasses | None = None  # both kinds' passes, before the serving copy is chosen
    fusion: Any = None  # ranking_service.fusion.Fusion, as it serves
    pools: Pools | None = None
    ranker_section: dict[str, Any] | None = None

    @classmethod
    def start(
        cls, options: BuildOptions, inputs: BuildInputs, given: pd.DataFrame | None, stage: Path
    ) -> BuildState:
        from recsys.core.encoder import default_encoder_dir
        from recsys.offline.fitting import hold_out_queries

        train, validation, record = _validation(options, inputs.interactions, given)
        encoder_dir = options.encoder or default_encoder_dir()
        known, warm_start = _warm_start(options, encoder_dir)
        train_queries, fusion_queries = hold_out_queries(inputs.queries, options.seed)
        return cls(
            options,
            inputs,
            train,
            validation,
            record,
            stage,
            encoder_dir,
            known,
            warm_start,
            train_queries,
            fusion_queries,
        )

    @property
    def fitting(self) -> BuildInputs:
        """The inputs with the training interactions only."""
        return replace(self.inputs, interactions=self.train)


def _retrieval_step(build: BuildState) -> dict[str, Any]:
    """The catalog, its embeddings (reused where the live version's are) and the ANN index."""
    from retrieval_service.build import build_retrieval
    from retrieval_service.catalog import save_catalog

    options = build.options
    save_catalog(build.inputs.catalog, build.stage / bundle_files.CATALOG)
    build.retrieval = build_retrieval(
        build.inputs.catalog,
        build.stage,
        encoder_dir=build.encoder_dir,
        pooling=options.pooling,  # type: ignore[arg-type]
        factory=options.index_factory,
        device=options.device,
        known=build.known,
    )
    return dict(build.retrieval.manifest)


def _cf_search_step(build: BuildState) -> dict[str, Any]:
    from recsys.offline.cf_search import search_item_item

    build.cf_params, build.cf_search = _cf_params(build.options, build.train, build.validation)
    build.item_item_search = search_item_item(
        build.train, build.validation, build.options.relevant_min_weight
    )
    return {}


def _cf_step(build: BuildState) -> dict[str, Any]:
    """CF on the training interactions, and the version being built served in this process:
    pools come from it as from serving."""
    from gateway.candidates import PoolPolicy
    from ranking_service.cf import CFModel
    from ranking_service.content import ItemVectors
    from ranking_service.fusion import ConvexFusion
    from ranking_service.ranker import Ranker
    from recsys.offline.local import Pools

    options, params = build.options, build.cf_params
    assert params is not None
    log.info("training CF (ALS) on %d interactions before the validation ones", len(build.train))
    cf = CFModel.train(build.train, seed=options.seed, **params.kwargs())
    content = ItemVectors.load(build.stage)
    content.sequence, text_sequence = _text_sequence(build, content)
    # Without a cross-encoder: CF recall and scores, content similarities, item-to-item.
    ranker = Ranker(
        cf,
        ConvexFusion(alpha=options.fusion_alpha),
        None,
        {},
        content=content,
        item_item=build.item_item_search.model,
    )
    retriever = _staged_retriever(build.fitting, build.retrieval, build.stage)
    # Without the new-product search: the staged version's products all have interactions,
    # and fusion learns new products from the ones fitting.user_lists treats as new.
    policy = PoolPolicy(cf_share=options.cf_candidate_share, new_item_slot=0)
    build.pools = Pools(retriever, ranker, options.candidate_pool, policy)
    return {"text_sequence": text_sequence}


def _text_sequence(
    build: BuildState, store: ItemVectors
) -> tuple[TextSequence | None, dict[str, Any]]:
    """The text sequence model trained on the training side's sequences of `store`'s items (its
    epochs stopped on the validation items), saved into the version, and the manifest's record.
    It is not refitted with the validation items: fusion learned its weight for this one."""
    from ranking_service import text_sequence
    from recsys.offline.heldout import HeldOut
    from recsys.offline.splits import histories

    def known(items: list[str]) -> list[int]:
        return [r for r in store.rows(items) if r is not None]

    sequences = [known(items[::-1]) for items in histories(build.train).values()]
    held = HeldOut.of(build.train, build.validation, build.options.relevant_min_weight)
    held_out = [
        (known(held.histories[user]), row)
        for user, items in sorted(held.relevant.items())
        for row in known(sorted(items))
    ]
    log.info("training the text sequence model on %d sequences", len(sequences))
    model, record = text_sequence.train(store.matrix, sequences, held_out, build.options.seed)
    if model is not None:
        model.save(build.stage)
    return model, record


def _ranker_step(build: BuildState) -> dict[str, Any] | None:
    """The cross-encoder fine-tuned on the training side (None: the build has none)."""
    from recsys.app.build_ranker import train_ranker

    if build.options.ranker is None:
        return None
    assert build.pools is not None
    build.ranker_section = train_ranker(
        build.options,
        build.fitting,
        build.pools,
        build.encoder_dir,
        build.stage,
        build.train_queries,
    )
    return {"cross_encoder": build.ranker_section}


def _fusion_step(build: BuildState) -> dict[str, Any]:
    """Both kinds' two passes fitted on the held-out lists."""
    from recsys.app.build_ranker import logged_queries
    from recsys.offline.fitting import fit_fusion, validation_queries
    from recsys.offline.heldout import HeldOut

    options = build.options
    assert build.pools is not None
    build.fitted = fit_fusion(
        _fitting_settings(options),
        build.pools,
        build.stage,
        HeldOut.of(build.train, build.validation, options.relevant_min_weight),
        build.fusion_queries + validation_queries(build.validation),
        # The cross-encoder reads a search only where it was fine-tuned on some.
        searched=bool(build.train_queries) or bool(logged_queries(build.train)),
        tuned_queries=build.train_queries,
    )
    return {}


def _copies_step(build: BuildState) -> dict[str, Any] | None:
    """The student and the int8 copies, from training-side pairs: only where fusion found the
    cross-encoder pays for some kind of request, unless the options ask for them always."""
    from recsys.app.build_ranker import cheaper_copies, train_side_contexts, train_side_pairs

    if build.ranker_section is None:
        return None
    assert build.pools is not None and build.fitted is not None
    if not (build.fitted.cross_encoder_pays or build.options.always_copies):
        build.ranker_section["copies"] = COPIES_SKIPPED
        log.info("no cheaper cross-encoder copies: %s", COPIES_SKIPPED)
        return None
    contexts = train_side_contexts(build.options)
    pairs = train_side_pairs(
        build.options, build.fitting, build.pools, build.train_queries, contexts
    )
    build.ranker_section |= cheaper_copies(build.options, build.stage, build.encoder_dir, pairs)
    return {"cross_encoder": build.ranker_section}


COPIES_SKIPPED = (
    "skipped: the cross-encoder pays for no kind of request; forced on (RECSYS_RERANK_KINDS=all)"
    " the fine-tuned model serves"
)


def _serving_fusion_step(build: BuildState) -> dict[str, Any]:
    """The fusion saved as it serves: which cross-encoder copy, rerank depths within budget."""
    from ranking_service.fusion import save_fusion
    from recsys.offline.fitting import with_serving_copy

    assert build.fitted is not None
    student = (build.ranker_section or {}).get("student", {})
    fusion, parity = with_serving_copy(
        _fitting_settings(build.options),
        build.stage,
        build.fitted,
        student_agreement=student.get("held_out", {}).get("spearman"),
    )
    save_fusion(fusion, build.stage / bundle_files.FUSION)
    build.fusion = fusion
    section: dict[str, Any] = {"fusion": fusion.to_dict()}
    if build.ranker_section is not None:
        section["cross_encoder"] = build.ranker_section | parity
    return section


def _fitting_settings(options: BuildOptions) -> FittingSettings:
    from recsys.offline.fitting import FittingSettings

    return FittingSettings(
        seed=options.seed,
        fusion_alpha=options.fusion_alpha,
        fusion_lists=options.fusion_lists,
        rerank_budget_ms=options.rerank_budget_ms,
        relevant_min_weight=options.relevant_min_weight,
        device=options.device,
        max_length=None if options.ranker is None else options.ranker.max_length,
    )


def _cf_refit_step(build: BuildState) -> dict[str, Any]:
    """CF refitted on every interaction once fusion is fitted: the one the version serves; the
    item-to-item model with it (its recall lists were in the pools fusion was fitted on, so it
    stays even where the gate gave its scores no weight)."""
    from ranking_service.cf import CFModel
    from ranking_service.fusion import reads
    from ranking_service.item_item import ItemItem

    assert build.cf_params is not None and build.pools is not None
    cf, item_item = build.pools.ranker.cf, build.pools.ranker.item_item
    everything = pd.concat([build.train, build.validation], ignore_index=True)
    if len(build.validation):
        log.info("refitting CF on all %d interactions", len(everything))
        cf = CFModel.train(everything, seed=build.options.seed, **build.cf_params.kwargs())
    out_dir = build.stage / bundle_files.CF_DIR
    section = {**cf.save(out_dir), "search": build.cf_search}
    search = build.item_item_search
    if item_item is None:
        section["item_item"] = {
            "skipped": "no interactions to learn it from",
            "search": search.record,
        }
    else:
        if len(build.validation):
            item_item = ItemItem.train(everything, search.lam)
        assert item_item is not None
        section["item_item"] = {
            **item_item.save(out_dir),
            "scores_weighed": reads(build.fusion, "item_item"),
            "search": search.record,
        }
    if not cf.n_users:
        section["skipped"] = (
            "no user interactions: a search bundle (CF knows no one; recommendations come "
            "from content)"
        )
    return {"cf": section}


# (timing name, step), in order; steps with the same name add up their seconds.
STEPS: list[tuple[str, Callable[[BuildState], dict[str, Any] | None]]] = [
    ("retrieval", _retrieval_step),
    ("cf_search", _cf_search_step),
    ("cf", _cf_step),
    ("ranker", _ranker_step),
    ("fusion", _fusion_step),
    ("copies", _copies_step),
    ("fusion", _serving_fusion_step),
    ("cf", _cf_refit_step),
]


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
    from recsys.offline.splits import hold_out_recent

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
    from recsys.offline.cf_search import search_cf

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


def _staged_retriever(inputs: BuildInputs, retrieval: Any, stage: Path) -> Any:
    """A Retriever over the version being built (offline: no journal)."""
    from recsys.app.ingest import catalog_items
    from retrieval_service.backends import FaissCatalog
    from retrieval_service.catalog import ItemStore
    from retrieval_service.retriever import Retriever

    vectors = np.load(stage / bundle_files.EMBEDDINGS)
    store = ItemStore(catalog_items(inputs.catalog), vectors)
    return Retriever(retrieval.encoder, FaissCatalog(store, retrieval.index), "staging")
