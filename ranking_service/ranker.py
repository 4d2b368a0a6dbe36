"""Scores candidates for a context: cross-encoder (batched) + CF (with fold-in) + fusion."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ranking_service import plan
from ranking_service.batching import DynamicBatcher
from ranking_service.cf import CFModel
from ranking_service.content import ItemVectors
from ranking_service.copies import DIRS, Scorer, load_copy, served_copy
from ranking_service.cross_encoder import DEFAULT_MAX_LENGTH, context_text
from ranking_service.features import StageScores
from ranking_service.fusion import Fusion, TwoPassFusion, load_fusion, plan_for, reads
from ranking_service.item_item import ItemItem
from ranking_service.plan import FirstPass
from recsys.core import bundle as bundle_files
from recsys.core.bundle import Bundle
from recsys.core.devices import resolve_device
from recsys.core.domain import Candidate, RankContext, Scored, Scores
from recsys.core.encoder import TextEncoder
from recsys.core.errors import InvalidInput, NotFound
from recsys.core.scoring import reciprocal_rank_fusion
from recsys.core.settings import Settings, default

log = logging.getLogger(__name__)

# Short-term CF folds the user in from only this many most recent history items: the current
# taste, next to CF's long-term view (the evaluation's cf_recent baseline tunes the window).
RECENT_HISTORY_ITEMS = 10
# ModelVersions.cross_encoder of an answer the cross-encoder did not score.
CROSS_ENCODER_SKIPPED = "skipped"


@dataclass(frozen=True)
class RankOutcome:
    """Candidates best first, and whether CF folded the user in from the request's history."""

    scored: list[Scored]
    cf_folded_in: bool
    # The versions that answered this request (the cross-encoder's may say it was skipped).
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Recall:
    """CF's own candidates, best first, and whether the user was folded in from history."""

    items: list[tuple[str, float]]
    cf_folded_in: bool


class Ranker:
    """Owns the ranking models of one bundle version; `rank` is safe to call concurrently."""

    def __init__(
        self,
        cf: CFModel,
        fusion: Fusion,
        batcher: DynamicBatcher | None,
        versions: dict[str, str],
        max_text_chars: int = default("max_text_chars"),
        rerank_depth: int | None = None,
        rerank_all_kinds: bool = False,
        scorer: Scorer | None = None,
        content: ItemVectors | None = None,
        item_item: ItemItem | None = None,
    ) -> None:
        self.cf = cf
        # EASE weights and sequence transitions (None: the bundle has none).
        self.item_item = item_item
        # The bundle's item embeddings for content-similarity features (None: none computed).
        self.content = content
        self.fusion = fusion
        self.batcher = batcher
        self.versions = versions
        self.max_text_chars = max_text_chars
        # The cross-encoder copy behind the batcher, for offline callers that batch themselves.
        self.scorer = scorer
        # The bundle's validated plan per kind of request, with this process's overrides
        # (benchmarks compare against single-pass); fixed for the Ranker's life.
        self._plans = {
            has_query: _overridden(plan_for(fusion, has_query), rerank_depth, rerank_all_kinds)
            for has_query in (False, True)
        }

    def with_cf(self, cf: CFModel, item_item: ItemItem | None) -> Ranker:
        """This ranker with other collaborative models, for offline callers (`combine`): what
        serving would answer had they seen other interactions."""
        ranker = self._offline_copy()
        ranker.cf, ranker.item_item = cf, item_item
        return ranker

    def with_content(self, content: ItemVectors) -> Ranker:
        """This ranker computing content similarity whatever its fusion reads (evaluation refits
        fusion on every feature), for offline callers."""
        ranker = self._offline_copy()
        ranker.content = content
        return ranker

    def _offline_copy(self) -> Ranker:
        """A copy with the same models and plans but no batcher: the batcher belongs to the
        serving Ranker, and offline callers score through `scorer` themselves."""
        ranker = copy.copy(self)
        ranker.batcher = None
        return ranker

    @classmethod
    def load(cls, bundle: Bundle, settings: Settings) -> Ranker:
        """Loads CF, fusion and (when the bundle has one) the cross-encoder; blocking."""
        manifest = bundle.manifest
        cf = CFModel.load(bundle.file(bundle_files.CF_DIR))
        fusion = load_fusion(bundle.file(bundle_files.FUSION))
        batcher = None
        scorer: Scorer | None = None
        ce_name = ""
        if manifest.get("cross_encoder"):
            scorer, ce_name = load_cross_encoder(bundle, settings)
            batcher = DynamicBatcher(
                lambda pairs: scorer.score(
                    pairs,
                    batch_size=settings.rank_max_batch_pairs,
                    max_batch_tokens=settings.rank_max_batch_tokens,
                ),
                max_batch_pairs=settings.rank_max_batch_pairs,
                max_wait_s=settings.rank_max_wait_ms / 1000,
                max_queue_pairs=settings.rank_max_queue_pairs,
            )
        versions = {
            "bundle_version": bundle.version,
            "cross_encoder": ce_name,
            "cf": f"als-{manifest['cf']['factors']}",
            "fusion": fusion.kind,
        }
        return cls(
            cf,
            fusion,
            batcher,
            versions,
            settings.max_text_chars,
            settings.rerank_depth,
            settings.rerank_kinds == "all",
            scorer,
            _content(bundle, fusion, settings),
            ItemItem.load(bundle.file(bundle_files.CF_DIR)),
        )

    def start(self) -> None:
        """Starts the batcher's worker on the running event loop."""
        if self.batcher is not None:
            self.batcher.start()

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.close()

    def validate(self, context: RankContext, candidates: Sequence[Candidate]) -> None:
        """InvalidInput naming the field for texts over the limit, empty or duplicate ids."""
        if len(context.query) > self.max_text_chars:
            raise InvalidInput(
                f"context.query: {len(context.query)} chars, limit {self.max_text_chars}"
            )
        seen: set[str] = set()
        for i, cand in enumerate(candidates):
            if not cand.item_id:
                raise InvalidInput(f"candidates[{i}].item_id: empty")
            if cand.item_id in seen:
                raise InvalidInput(f"candidates[{i}].item_id: duplicate {cand.item_id!r}")
            if len(cand.text) > self.max_text_chars:
                raise InvalidInput(
                    f"candidates[{i}].text: {len(cand.text)} chars, limit {self.max_text_chars}"
                )
            seen.add(cand.item_id)
        for i, hist in enumerate(context.history):
            if len(hist.text) > self.max_text_chars:
                raise InvalidInput(f"context.history[{i}].text: over {self.max_text_chars} chars")

    async def rank(self, context: RankContext, candidates: Sequence[Candidate]) -> RankOutcome:
        """Two passes: fusion without the cross-encoder over every candidate, then, where the
        bundle found it pays for this kind of request, the cross-encoder and a second fusion
        over the first pass's top `rerank_depth`."""
        self.validate(context, candidates)
        if not candidates:
            return RankOutcome([], cf_folded_in=False, versions=self._versions(False))
        # CF's solves and fusion are numpy work that would stall every request on the event
        # loop, so they run in worker threads.
        stages, folded, first = await asyncio.to_thread(
            self._first_pass, context, candidates, self.batcher is not None
        )
        if first.rows.size == 0:
            return await asyncio.to_thread(self._outcome, candidates, stages, first, folded)
        assert self.batcher is not None
        text = context_text(context)
        ce = await self.batcher.submit([(text, candidates[i].text) for i in first.rows])
        return await asyncio.to_thread(self._outcome, candidates, stages, first, folded, ce)

    def combine(
        self, context: RankContext, candidates: Sequence[Candidate], ce: np.ndarray | None
    ) -> RankOutcome:
        """What `rank` answers, given cross-encoder scores for every candidate (offline, where
        they are computed in large batches); only those `rank` would compute are used."""
        stages, folded, first = self._first_pass(context, candidates, ce is not None)
        ce_rows = None if ce is None else ce[first.rows]
        return self._outcome(candidates, stages, first, folded, ce_rows)

    def rerank_rows(self, context: RankContext, candidates: Sequence[Candidate]) -> np.ndarray:
        """The candidates `rank` would have the cross-encoder score (offline callers score only
        these before `combine`)."""
        return self._first_pass(context, candidates, can_score=True)[2].rows

    def plan(self, has_query: bool) -> TwoPassFusion:
        """The bundle's two passes for this kind of request, with this process's overrides."""
        return self._plans[has_query]

    def _first_pass(
        self, context: RankContext, candidates: Sequence[Candidate], can_score: bool
    ) -> tuple[StageScores, bool, FirstPass]:
        """The stage scores, whether CF folded in, and the first pass with the rows the
        cross-encoder rescores: none without a model (`can_score`) or a context to read."""
        stages, folded = self.stage_scores(context, candidates)
        can_rerank = can_score and bool(context_text(context))
        return stages, folded, plan.first_pass(self.plan(stages.has_query), stages, can_rerank)

    def _outcome(
        self,
        candidates: Sequence[Candidate],
        stages: StageScores,
        first: FirstPass,
        folded: bool,
        ce_rows: np.ndarray | None = None,
    ) -> RankOutcome:
        """The candidates best fused first, with each stage's score (None where it did not run)."""
        two_pass = self.plan(stages.has_query)
        if ce_rows is None or first.rows.size == 0:
            fused = first.scores
        else:
            fused = plan.final(two_pass, stages, first, ce_rows)
            stages = plan.with_ce(stages, first.rows, ce_rows)
        ce, cf = stages.ce, stages.cf
        first_rank = np.empty(len(candidates), np.int64)
        first_rank[plan.order(first.scores)] = np.arange(1, len(candidates) + 1)
        scored = [
            Scored(
                item_id=candidates[i].item_id,
                scores=Scores(
                    fused=float(fused[i]),
                    cross_encoder=None if ce is None or np.isnan(ce[i]) else float(ce[i]),
                    cf=None if np.isnan(cf[i]) else float(cf[i]),
                    retrieval=candidates[i].retrieval_score,
                    lexical=candidates[i].lexical_score,
                    first_pass_rank=int(first_rank[i]),
                ),
            )
            for i in plan.order(fused)
        ]
        return RankOutcome(scored, cf_folded_in=folded, versions=self._versions(ce is not None))

    def _versions(self, cross_encoder_ran: bool) -> dict[str, str]:
        """The versions that answered; the cross-encoder's says when it was skipped."""
        if cross_encoder_ran or not self.versions.get("cross_encoder"):
            return dict(self.versions)
        return {**self.versions, "cross_encoder": CROSS_ENCODER_SKIPPED}

    def stage_scores(
        self, context: RankContext, candidates: Sequence[Candidate]
    ) -> tuple[StageScores, bool]:
        """Every stage's scores but the cross-encoder's for the candidates (what fusion reads),
        and whether CF folded the user in: the one place each signal is computed."""
        cf, folded = self._cf(context, candidates)
        ids = [c.item_id for c in candidates]
        history = [h.item_id for h in context.history]
        recent = self.cf.fold_in(history[:RECENT_HISTORY_ITEMS])
        retrieval = _scores([c.retrieval_score for c in candidates])
        lexical = _scores([c.lexical_score for c in candidates])
        # Text is read for what the catalog lacks: products added after the build.
        texts = {c.item_id: c.text for c in candidates} | {
            h.item_id: h.text for h in context.history
        }
        content = None if self.content is None else self.content.scores(ids, history, texts)
        neighbours = (
            None
            if self.item_item is None
            # A known user asked without a history: what they had at training.
            else self.item_item.scores(history or self.cf.items_of(context.user_id), ids)
        )
        stages = StageScores(
            cf=cf,
            retrieval=_present(retrieval),
            lexical=_present(lexical),
            popularity=self.cf.popularity(ids),
            cf_recent=None if recent is None else self.cf.scores(recent, ids),
            content_nearest=None if content is None else content.nearest,
            content_recent=None if content is None else content.recent,
            content_sequence=None if content is None else _present(content.sequence),
            item_item=None if neighbours is None else neighbours.weights,
            transitions=None if neighbours is None else neighbours.transitions,
            has_query=bool(context.query.strip()),
        )
        return stages, folded

    def recall(
        self, user_id: str, history: Sequence[str], k: int, exclude: Collection[str] = ()
    ) -> Recall:
        """CF's top k for the user, never an item of `history` or `exclude`: ALS's list and,
        with an item-to-item model, its two lists from the history, merged by reciprocal rank
        fusion; blocking (numpy)."""
        user, folded = self._user_vector(user_id, history)
        # What the user already has is no recommendation: the request's history and, for a
        # user CF was trained on, what they had then.
        known = self.cf.items_of(user_id) if user_id else []
        skip = {*exclude, *history, *known}
        lists = [] if user is None else [self.cf.recommend(user, k, exclude=skip)]
        if self.item_item is not None:
            lists += self.item_item.recommend(list(history) or known, k, skip)
        if not any(lists):
            raise NotFound(
                f"user_id {user_id!r}: unknown to CF, and CF knows none of history_item_ids"
                if user_id
                else "history_item_ids: CF knows none of these items"
            )
        if len(lists) == 1:
            return Recall(lists[0], folded)
        merged = reciprocal_rank_fusion([[item for item, _ in found] for found in lists])
        return Recall(merged[:k], folded)

    def _user_vector(self, user_id: str, history: Sequence[str]) -> tuple[np.ndarray | None, bool]:
        """The trained vector of a known user, else one folded in from history (then True)."""
        user = self.cf.user_vector(user_id) if user_id else None
        if user is None and history:
            user = self.cf.fold_in(history)
            return user, user is not None
        return user, False

    def _cf(self, context: RankContext, candidates: Sequence[Candidate]) -> tuple[np.ndarray, bool]:
        """CF scores (NaN where missing) and whether the user was folded in from history."""
        user, folded = self._user_vector(context.user_id, [h.item_id for h in context.history])
        if user is None:
            return np.full(len(candidates), np.nan, np.float32), False
        return self.cf.scores(user, [c.item_id for c in candidates]), folded


def _present(scores: np.ndarray) -> np.ndarray | None:
    """The scores, or None where no candidate has one (the stage did not run)."""
    return None if np.isnan(scores).all() else scores


def _content(bundle: Bundle, fusion: Fusion, settings: Settings) -> ItemVectors | None:
    """The item embeddings, where the bundle's fusion reads content similarity (its cost:
    benchmarks/README.md), with the bundle's encoder for the products added after the build:
    fusion was fitted on lists where some products had nothing but their text."""
    if not reads(fusion, "content"):
        return None
    return ItemVectors.load(bundle.path, TextEncoder.of_bundle(bundle, settings.device))


def _overridden(
    two_pass: TwoPassFusion, rerank_depth: int | None, rerank_all_kinds: bool
) -> TwoPassFusion:
    """The plan with a settings' rerank depth and, for `rerank_kinds=all`, the cross-encoder on
    wherever there is a second pass to use it."""
    return replace(
        two_pass,
        rerank_depth=two_pass.rerank_depth if rerank_depth is None else rerank_depth,
        cross_encoder_pays=two_pass.cross_encoder_pays
        or (rerank_all_kinds and two_pass.second is not None),
    )


def load_cross_encoder(bundle: Bundle, settings: Settings) -> tuple[Scorer, str]:
    """The copy of the bundle's cross-encoder that serves here, and its version name: the one
    the build validated, or the one the settings name (see ranking_service.copies)."""
    section = bundle.manifest["cross_encoder"]
    max_length = int(section.get("max_length", DEFAULT_MAX_LENGTH))
    device = resolve_device(settings.device)
    asked = settings.cross_encoder_copy
    copy = served_copy(section.get("serving_copy", "fp32") if asked == "bundle" else asked, device)
    if copy != "fp32" and copy not in section:
        raise InvalidInput(
            f"bundle {bundle.version} has no {copy} cross-encoder (RECSYS_CROSS_ENCODER_COPY={asked})"
        )
    scorer = load_copy(copy, bundle.path, max_length, device, settings.rank_threads)
    return scorer, f"{bundle.version}/{DIRS[copy]}"


def _scores(values: Sequence[float | None]) -> np.ndarray:
    """A retriever's score per candidate, NaN where it gave none."""
    return np.array([np.nan if v is None else v for v in values], dtype=np.float32)
