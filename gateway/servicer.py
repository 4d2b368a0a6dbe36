"""The gateway gRPC edge: validate Recommend, run the pipeline, build the reply."""

from __future__ import annotations

import asyncio
import logging
import math

import grpc

from gateway.pipeline import RecommendPipeline
from gateway.protocol import Recommendation, RecommendRequest
from gateway.stages import GrpcRankingStage, GrpcRetrievalStage
from recsys.core import metrics
from recsys.core.errors import InvalidInput, NotReady
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2

log = logging.getLogger(__name__)

# Back-off while waiting at start-up for retrieval to answer.
LOAD_RETRY_MIN_S = 0.5
LOAD_RETRY_MAX_S = 5.0

STAGES = {
    "retrieval": gateway_pb2.STAGE_RETRIEVAL,
    "ranking": gateway_pb2.STAGE_RANKING,
    "diversity": gateway_pb2.STAGE_DIVERSITY,
    "total": gateway_pb2.STAGE_TOTAL,
}


def validate(msg: gateway_pb2.RecommendRequest, settings: Settings) -> RecommendRequest:
    """A RecommendRequest within the limits, or InvalidInput naming the offending field.

    A user id alone is enough when CF knows the user (candidates then come from CF only).
    """
    query = msg.query.strip()
    user_id = msg.user_id.strip()
    history = tuple(i.strip() for i in msg.history_item_ids)
    if not (query or user_id or history):
        raise InvalidInput("query, user_id, history_item_ids: give at least one")
    for name, text in (("query", query), ("user_id", user_id)):
        if len(text) > settings.max_text_chars:
            raise InvalidInput(f"{name}: {len(text)} chars, limit {settings.max_text_chars}")
    if len(history) > settings.max_history_items:
        raise InvalidInput(
            f"history_item_ids: {len(history)} ids, limit {settings.max_history_items}"
        )
    if "" in history:
        raise InvalidInput("history_item_ids: an id is empty")
    excluded = frozenset(i.strip() for i in msg.filter.exclude_item_ids)
    if "" in excluded:
        raise InvalidInput("filter.exclude_item_ids: an id is empty")
    k = msg.k or settings.default_k
    if not 1 <= k <= settings.max_k:
        raise InvalidInput(f"k: {msg.k} is outside 1..{settings.max_k}")
    pool = msg.candidate_pool or max(
        k, min(settings.default_candidate_pool, settings.max_candidate_pool)
    )
    if not k <= pool <= settings.max_candidate_pool:
        raise InvalidInput(
            f"candidate_pool: {pool} is outside k..{settings.max_candidate_pool} (k={k})"
        )
    if math.isnan(msg.diversity) or not 0.0 <= msg.diversity <= 1.0:
        raise InvalidInput(f"diversity: {msg.diversity} is outside 0..1")
    return RecommendRequest(
        k=k,
        candidate_pool=pool,
        user_id=user_id,
        query=query,
        history_item_ids=history,
        diversity=float(msg.diversity),
        categories=frozenset(msg.filter.categories),
        exclude_item_ids=excluded,
    )


def to_proto(answer: Recommendation) -> gateway_pb2.RecommendResponse:
    """The domain answer as a RecommendResponse; unknown version fields stay empty."""
    version_fields = common_pb2.ModelVersions.DESCRIPTOR.fields_by_name
    return gateway_pb2.RecommendResponse(
        items=[
            gateway_pb2.RecommendedItem(
                item_id=i.item_id,
                title=i.title,
                category=i.category,
                score=i.score,
                scores=convert.scores_to_proto(i.scores),
                new_product=i.new_product,
            )
            for i in answer.items
        ],
        degraded=answer.degraded,
        degraded_reasons=[str(r) for r in answer.degraded_reasons],
        timings=[
            gateway_pb2.StageTiming(stage=STAGES[name], seconds=seconds)
            for name, seconds in answer.timings.items()
            if name in STAGES
        ],
        versions=common_pb2.ModelVersions(
            **{k: v for k, v in answer.versions.items() if k in version_fields}
        ),
    )


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """Proto in → validated RecommendRequest → RecommendPipeline → proto out."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pipeline: RecommendPipeline | None = None  # set once retrieval has answered

    async def Recommend(
        self, request: gateway_pb2.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RecommendResponse:
        pipeline = self.pipeline
        if pipeline is None:
            raise NotReady(
                f"gateway is starting: waiting for retrieval at {self.settings.retrieval_address}"
            )
        validated = validate(request, self.settings)
        # Python gRPC does not propagate deadlines: pass the caller's on to every stage.
        answer = await pipeline.recommend(validated, context.time_remaining())
        return to_proto(answer)


class GatewayService:
    """The gateway process (see recsys.rpc.server.Service): no model, two client channels."""

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
        """Opens both channels and retries until retrieval answers GetIndexInfo.

        Health stays NOT_SERVING meanwhile, and serve() cancels this on shutdown, so waiting
        without end is safe. Ranking is not waited for: without it answers are degraded.
        """
        metrics.init_gateway_metrics()
        self._retrieval = GrpcRetrievalStage(self.settings)
        self._ranking = GrpcRankingStage(self.settings)
        info = await self._wait_for_retrieval(self._retrieval)
        self.servicer.pipeline = RecommendPipeline(self._retrieval, self._ranking, self.settings)
        log.info(
            "gateway: retrieval %s serves bundle %s (%s, %s); ranking at %s",
            self._retrieval.target,
            info.bundle_version,
            info.encoder,
            info.index_factory,
            self._ranking.target,
        )
        return str(info.bundle_version)

    async def _wait_for_retrieval(
        self, retrieval: GrpcRetrievalStage
    ) -> retrieval_pb2.GetIndexInfoResponse:
        timeout = self.settings.default_budget_ms / 1000
        delay = LOAD_RETRY_MIN_S
        while True:
            try:
                return await retrieval.index_info(timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                log.info(
                    "waiting for retrieval at %s (%s); retrying in %.1fs",
                    retrieval.target,
                    exc.code().name,
                    delay,
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, LOAD_RETRY_MAX_S)

    async def close(self) -> None:
        self.servicer.pipeline = None
        for stage in (self._retrieval, self._ranking):
            if stage is not None:
                await stage.close()
