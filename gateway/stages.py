"""The two stages behind one interface: over gRPC (production) or in-process (benchmarks)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from recsys import convert
from recsys.domain import Candidate, Hit, Item, RankContext, Scored, SearchQuery
from recsys.errors import DeadlineExceeded, InvalidInput, NotReady, Overloaded, RecsysError
from recsys.serving import client_channel
from recsys.settings import Settings
from recsys.v1 import ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc


@dataclass(frozen=True)
class SearchResult:
    hits: list[Hit]
    bundle_version: str


@dataclass(frozen=True)
class RankResult:
    scored: list[Scored]
    versions: dict[str, str]


class RetrievalStage(Protocol):
    async def search(self, query: SearchQuery, timeout: float) -> SearchResult: ...

    async def get_items(
        self, item_ids: Sequence[str], timeout: float
    ) -> tuple[list[Item], list[str]]: ...

    async def close(self) -> None: ...


class RankingStage(Protocol):
    async def rank(
        self, context: RankContext, candidates: Sequence[Candidate], timeout: float
    ) -> RankResult: ...

    async def close(self) -> None: ...


class StageError(RecsysError):
    """Any other failure of a stage, carrying the gRPC code it answered with."""

    def __init__(self, stage: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{stage} failed with {code.name}: {details}")
        self.stage_code = code


def _domain_error(stage: str, target: str, exc: grpc.aio.AioRpcError) -> RecsysError:
    """Maps a stage's status to the domain error the pipeline decides on."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{stage} did not answer within the deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{stage} overloaded: {details}")
    if code == grpc.StatusCode.UNAVAILABLE:
        return NotReady(f"{stage} service unavailable at {target}: {details}")
    return StageError(stage, code, details)


class GrpcRetrievalStage:
    def __init__(self, settings: Settings) -> None:
        self.target = settings.retrieval_address
        self._channel = client_channel(self.target, settings)
        self._stub = retrieval_pb2_grpc.RetrievalServiceStub(self._channel)

    async def search(self, query: SearchQuery, timeout: float) -> SearchResult:
        try:
            reply = await self._stub.Search(convert.search_request(query), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise _domain_error("retrieval", self.target, exc) from None
        return SearchResult([convert.hit_from_proto(h) for h in reply.hits], reply.bundle_version)

    async def get_items(
        self, item_ids: Sequence[str], timeout: float
    ) -> tuple[list[Item], list[str]]:
        try:
            reply = await self._stub.GetItems(
                retrieval_pb2.GetItemsRequest(item_ids=list(item_ids)), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain_error("retrieval", self.target, exc) from None
        return [convert.item_from_proto(r.item) for r in reply.items], list(reply.missing_item_ids)

    async def index_info(self, timeout: float) -> Any:
        return await self._stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close(None)


class GrpcRankingStage:
    def __init__(self, settings: Settings) -> None:
        self.target = settings.ranking_address
        self._channel = client_channel(self.target, settings)
        self._stub = ranking_pb2_grpc.RankingServiceStub(self._channel)

    async def rank(
        self, context: RankContext, candidates: Sequence[Candidate], timeout: float
    ) -> RankResult:
        try:
            reply = await self._stub.Rank(
                convert.rank_request(context, candidates), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            raise _domain_error("ranking", self.target, exc) from None
        versions = {
            f.name: getattr(reply.versions, f.name) for f in reply.versions.DESCRIPTOR.fields
        }
        return RankResult([convert.scored_from_proto(s) for s in reply.candidates], versions)

    async def close(self) -> None:
        await self._channel.close(None)


class LocalRetrievalStage:
    """The Retriever in this process (no gRPC); work runs in threads, as the servicer does."""

    def __init__(self, retriever: Any) -> None:
        self.retriever = retriever

    async def search(self, query: SearchQuery, timeout: float) -> SearchResult:
        hits, _ = await asyncio.wait_for(asyncio.to_thread(self.retriever.search, query), timeout)
        return SearchResult(hits, self.retriever.version)

    async def get_items(
        self, item_ids: Sequence[str], timeout: float
    ) -> tuple[list[Item], list[str]]:
        found, missing = await asyncio.wait_for(
            asyncio.to_thread(self.retriever.get_items, item_ids), timeout
        )
        return [item for item, _ in found], missing

    async def close(self) -> None:
        return None


class LocalRankingStage:
    """The Ranker in this process (no gRPC)."""

    def __init__(self, ranker: Any) -> None:
        self.ranker = ranker

    async def rank(
        self, context: RankContext, candidates: Sequence[Candidate], timeout: float
    ) -> RankResult:
        try:
            outcome = await asyncio.wait_for(self.ranker.rank(context, candidates), timeout)
        except TimeoutError:
            raise DeadlineExceeded("ranking did not answer within the deadline") from None
        return RankResult(outcome.scored, dict(self.ranker.versions))

    async def close(self) -> None:
        return None
