"""The ranking gRPC edge: validate protos, call the Ranker, build replies."""

from __future__ import annotations

import asyncio

import grpc

from ranking_service.ranker import Ranker
from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput, NotReady
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.v1 import common_pb2, ranking_pb2, ranking_pb2_grpc


class RankingServicer(ranking_pb2_grpc.RankingServiceServicer):
    """Proto in → domain context and candidates → Ranker → proto out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ranker: Ranker | None = None

    async def Rank(
        self, request: ranking_pb2.RankRequest, context: grpc.aio.ServicerContext
    ) -> ranking_pb2.RankResponse:
        ranker = self.ranker
        if ranker is None:
            raise NotReady("ranking is loading its models; retry shortly")
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
        ranker = self.ranker
        if ranker is None:
            raise NotReady("ranking is loading its models; retry shortly")
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


class RankingService:
    """The ranking process: servicer plus model loading (see recsys.rpc.server.Service)."""

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
        ranker = await asyncio.to_thread(Ranker.load, bundle, self.settings)
        ranker.start()
        self.servicer.ranker = ranker
        return bundle.version

    async def close(self) -> None:
        if self.servicer.ranker is not None:
            await self.servicer.ranker.close()
            self.servicer.ranker = None
