"""The gateway gRPC edge: validate Recommend, run the pipeline, build the reply."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc

from gateway.pipeline import Recommendation, RecommendPipeline, RecommendRequest
from gateway.stages import GrpcRankingStage, GrpcRetrievalStage
from recsys import convert, metrics
from recsys.errors import InvalidInput, NotReady
from recsys.settings import Settings
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)

STAGES = {
    "retrieval": gateway_pb2.STAGE_RETRIEVAL,
    "ranking": gateway_pb2.STAGE_RANKING,
    "diversity": gateway_pb2.STAGE_DIVERSITY,
    "total": gateway_pb2.STAGE_TOTAL,
}


def validate(msg: gateway_pb2.RecommendRequest, settings: Settings) -> RecommendRequest:
    """A RecommendRequest within the limits, or InvalidInput naming the field."""
    query = msg.query.strip()
    history = [i.strip() for i in msg.history_item_ids]
    if not (query or msg.user_id.strip() or history):
        raise InvalidInput("query, user_id, history_item_ids: give at least one")
    if not (query or history):
        # Candidates come from retrieval, which needs text or items to search from.
        raise InvalidInput(
            "user_id alone: also send the user's recent history_item_ids (or a query)"
        )
    if len(query) > settings.max_text_chars:
        raise InvalidInput(f"query: {len(query)} chars, limit {settings.max_text_chars}")
    if len(history) > settings.max_history_items:
        raise InvalidInput(
            f"history_item_ids: {len(history)} ids, limit {settings.max_history_items}"
        )
    if any(not i for i in history):
        raise InvalidInput("history_item_ids: empty id")
    k = msg.k or settings.default_k
    if not 1 <= k <= settings.max_k:
        raise InvalidInput(f"k: {msg.k} is outside 1..{settings.max_k}")
    pool = msg.candidate_pool or max(k, settings.default_candidate_pool)
    if not k <= pool <= settings.max_candidate_pool:
        raise InvalidInput(
            f"candidate_pool: {msg.candidate_pool} must be within k..{settings.max_candidate_pool} (k={k})"
        )
    if math.isnan(msg.diversity) or not 0.0 <= msg.diversity <= 1.0:
        raise InvalidInput(f"diversity: {msg.diversity} is outside 0..1")
    return RecommendRequest(
        k=k,
        candidate_pool=pool,
        user_id=msg.user_id.strip(),
        query=query,
        history_item_ids=tuple(history),
        diversity=float(msg.diversity),
        categories=frozenset(msg.filter.categories),
        exclude_item_ids=frozenset(msg.filter.exclude_item_ids),
    )


def to_proto(answer: Recommendation) -> gateway_pb2.RecommendResponse:
    return gateway_pb2.RecommendResponse(
        items=[
            gateway_pb2.RecommendedItem(
                item_id=i.item_id,
                title=i.title,
                category=i.category,
                score=i.score,
                scores=convert.scores_to_proto(i.scores),
            )
            for i in answer.items
        ],
        degraded=answer.degraded,
        degraded_reasons=answer.degraded_reasons,
        timings=[
            gateway_pb2.StageTiming(stage=STAGES[name], seconds=seconds)
            for name, seconds in answer.timings.items()
        ],
        versions=common_pb2.ModelVersions(
            **{
                k: v
                for k, v in answer.versions.items()
                if k in common_pb2.ModelVersions.DESCRIPTOR.fields_by_name
            }
        ),
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline: RecommendPipeline | None = None

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        if self.pipeline is None:
            raise NotReady("gateway is starting: waiting for retrieval")
        validated = validate(request, self.settings)
        answer = await self.pipeline.recommend(validated, context.time_remaining())
        return to_proto(answer)


class GatewayService:
    """The gateway process (see recsys.serving.Service): no model, two client channels."""

    name = "gateway"
    full_name = "recsys.v1.GatewayService"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servicer = GatewayServicer(settings)
        self._retrieval: GrpcRetrievalStage | None = None
        self._ranking: GrpcRankingStage | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(self.servicer, server)

    async def load(self) -> str:
        """Connects to both stages and waits (health stays NOT_SERVING) until retrieval answers."""
        metrics.init_gateway_metrics()
        self._retrieval = GrpcRetrievalStage(self.settings)
        self._ranking = GrpcRankingStage(self.settings)
        while True:
            try:
                info = await self._retrieval.index_info(timeout=5)
                break
            except grpc.aio.AioRpcError as exc:
                log.info("waiting for retrieval at %s: %s", self._retrieval.target, exc.code().name)
                await asyncio.sleep(1.0)
        self.servicer.pipeline = RecommendPipeline(self._retrieval, self._ranking, self.settings)
        return str(info.bundle_version)

    async def close(self) -> None:
        self.servicer.pipeline = None
        for stage in (self._retrieval, self._ranking):
            if stage is not None:
                await stage.close()
