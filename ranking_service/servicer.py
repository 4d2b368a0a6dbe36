"""The ranking gRPC edge: validate protos, call the Ranker, build replies."""

from __future__ import annotations

import asyncio

import grpc

from ranking_service.ranker import Ranker
from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput
from recsys.core.live import LiveVersions
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc

LOADING = "ranking is loading its models; retry shortly"


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Proto in → domain context and candidates → Ranker → proto out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.live: LiveVersions[Ranker] = LiveVersions(
            "ranking", _close_ranker, settings.bundle_keep_previous_s, LOADING
        )

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        with self.live.use(request.bundle_version) as loaded:
            return await self._rank(loaded.value, request)

    async def _rank(
        self, ranker: Ranker, request: ranking_pb2.RankRequest
    ) -> ranking_pb2.RankResponse:
        if len(request.candidates) > self.settings.max_candidate_pool:
            raise InvalidInput(
                f"candidates: {len(request.candidates)}, limit {self.settings.max_candidate_pool}"
            )
        if len(request.context.history) > self.settings.max_history_items:
            raise InvalidInput(
                f"context.history: {len(request.context.history)} items, limit {self.settings.max_history_items}"
            )
        outcome = await ranker.rank(
            convert.rank_context_from_proto(request.context),
            convert.candidates_from_proto(request.candidates),
        )
        return ranking_pb2.RankResponse(
            candidates=[convert.scored_to_proto(s) for s in outcome.scored],
            versions=common_pb2.ModelVersions(**outcome.versions),
            cf_folded_in=outcome.cf_folded_in,
        )

    async def RecallCandidates(
        self, request: ranking_pb2.RecallCandidatesRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RecallCandidatesResponse:
        with self.live.use(request.bundle_version) as loaded:
            return await self._recall(loaded.value, request)

    async def _recall(
        self, ranker: Ranker, request: ranking_pb2.RecallCandidatesRequest
    ) -> ranking_pb2.RecallCandidatesResponse:
        if not 1 <= request.top_k <= self.settings.max_candidate_pool:
            raise InvalidInput(
                f"top_k: {request.top_k} is outside 1..{self.settings.max_candidate_pool}"
            )
        history = list(request.history_item_ids)
        if len(history) > self.settings.max_history_items:
            raise InvalidInput(
                f"history_item_ids: {len(history)} ids, limit {self.settings.max_history_items}"
            )
        if not (request.user_id or history):
            raise InvalidInput("user_id, history_item_ids: give at least one")
        # A scan over every item's factors: off the event loop, as all heavy compute.
        recall = await asyncio.to_thread(
            ranker.recall,
            request.user_id,
            history,
            request.top_k,
            frozenset(request.exclude_item_ids),
        )
        return ranking_pb2.RecallCandidatesResponse(
            items=[ranking_pb2.RecalledItem(item_id=i, cf_score=s) for i, s in recall.items],
            versions=common_pb2.ModelVersions(**ranker.versions),
            cf_folded_in=recall.cf_folded_in,
        )


async def _close_ranker(ranker: Ranker) -> None:
    await ranker.close()


class RankingService:
    """The ranking process: servicer plus model loading and hot swaps (see
    recsys.rpc.server.Service and Reloadable)."""

    name = "ranking"
    full_name = "recsys.v1.RankingService"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servicer = RankingServicer(settings)

    def add_to_server(self, server: grpc.aio.Server) -> None:
        ranking_pb2_grpc.add_RankingServiceServicer_to_server(self.servicer, server)

    async def load(self) -> str:
        if self.settings.bundle is None:
            raise InvalidInput("--bundle (RECSYS_BUNDLE) is required")
        bundle = Bundle.open(self.settings.bundle)
        await self._load(bundle)
        return bundle.version

    async def reload(self, version: str) -> None:
        """Loads `version`'s models beside the live ones (in a worker thread) and makes them
        live; the previous ones answer pinned requests until they are retired."""
        assert self.settings.bundle is not None
        await self._load(Bundle.open(self.settings.bundle, version))

    async def _load(self, bundle: Bundle) -> None:
        ranker = await asyncio.to_thread(Ranker.load, bundle, self.settings)
        ranker.start()
        self.servicer.live.switch(bundle.version, ranker)

    async def close(self) -> None:
        await self.servicer.live.close()
