"""The two stages behind one interface; over gRPC here (in-process twins: recsys.offline.local)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
import numpy as np

from recsys.core.domain import Candidate, Hit, Item, RankContext, Scored, SearchQuery
from recsys.core.errors import DeadlineExceeded
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.rpc.channels import ServiceChannel
from recsys.rpc.status import error_from_rpc
from recsys.v1 import ranking_pb2, ranking_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")

# The ModelVersions fields retrieval can tell (its bundle version comes with every answer).
RETRIEVAL_VERSION_FIELDS = ("encoder", "index_factory")
# Bundle versions whose index info the gateway remembers.
KEEP_INFOS = 4


@dataclass(frozen=True)
class SearchResult:
    """Retrieval's candidates, best first, and the versions of the index that answered."""

    hits: list[Hit]
    bundle_version: str
    # encoder / index_factory when known for this bundle version, else absent.
    versions: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RankResult:
    """Ranking's candidates, best (fused) first, and the model versions that scored them
    (`bundle_version` among them)."""

    scored: list[Scored]
    versions: dict[str, str]
    cf_folded_in: bool = False


@dataclass(frozen=True)
class RecallResult:
    """CF's own candidates (item id, CF score), best first, and the bundle version of CF."""

    items: list[tuple[str, float]]
    cf_folded_in: bool = False
    bundle_version: str = ""


@dataclass(frozen=True)
class ItemsResult:
    """Known items with their vectors (None unless asked for), the ids retrieval does not know,
    and the bundle version that answered."""

    found: list[tuple[Item, np.ndarray | None]]
    missing: list[str]
    bundle_version: str = ""


# Every stage call takes `version`: the bundle version to answer with ("" for the live one);
# a stage that does not hold it raises VersionUnavailable.


class RetrievalStage(Protocol):
    async def search(
        self, query: SearchQuery, timeout: float, version: str = ""
    ) -> SearchResult: ...

    async def get_items(
        self,
        item_ids: Sequence[str],
        timeout: float,
        include_vectors: bool = False,
        version: str = "",
    ) -> ItemsResult: ...

    async def close(self) -> None: ...


class RankingStage(Protocol):
    async def rank(
        self,
        context: RankContext,
        candidates: Sequence[Candidate],
        timeout: float,
        version: str = "",
    ) -> RankResult: ...

    async def recall(
        self,
        user_id: str,
        history: Sequence[str],
        k: int,
        exclude: frozenset[str],
        timeout: float,
        version: str = "",
    ) -> RecallResult: ...

    async def close(self) -> None: ...


async def within(call: Awaitable[T], timeout: float, stage: str) -> T:
    """Awaits `call` for at most `timeout` seconds; running out is DeadlineExceeded."""
    try:
        return await asyncio.wait_for(call, timeout)
    except TimeoutError:
        raise DeadlineExceeded(f"{stage} did not answer within {timeout:.3f}s") from None


class GrpcRetrievalStage:
    """RetrievalService over a client channel; remembers the index info for the versions."""

    def __init__(self, settings: Settings) -> None:
        self.target = settings.retrieval_address
        self._channel = ServiceChannel(self.target, settings)
        # Index info per bundle version seen (the previous one answers pinned requests).
        self._info: dict[str, retrieval_pb2.GetIndexInfoResponse] = {}
        self._refresh: asyncio.Task[None] | None = None

    @property
    def _stub(self) -> retrieval_pb2_grpc.RetrievalServiceStub:
        return self._channel.stub(retrieval_pb2_grpc.RetrievalServiceStub)

    async def search(self, query: SearchQuery, timeout: float, version: str = "") -> SearchResult:
        request = convert.search_request(query)
        request.bundle_version = version
        try:
            reply = await self._stub.Search(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc("retrieval", self.target, exc) from None
        hits = [convert.hit_from_proto(h) for h in reply.hits]
        return SearchResult(hits, reply.bundle_version, self._versions(reply.bundle_version))

    async def get_items(
        self,
        item_ids: Sequence[str],
        timeout: float,
        include_vectors: bool = False,
        version: str = "",
    ) -> ItemsResult:
        try:
            reply = await self._stub.GetItems(
                retrieval_pb2.GetItemsRequest(
                    item_ids=list(item_ids),
                    include_vectors=include_vectors,
                    bundle_version=version,
                ),
                timeout=timeout,
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc("retrieval", self.target, exc) from None
        found = [
            (
                convert.item_from_proto(r.item),
                np.asarray(r.vector, dtype=np.float32) if len(r.vector) else None,
            )
            for r in reply.items
        ]
        return ItemsResult(found, list(reply.missing_item_ids), reply.bundle_version)

    async def index_info(self, timeout: float) -> retrieval_pb2.GetIndexInfoResponse:
        """GetIndexInfo (raises grpc.aio.AioRpcError); the answer is kept for `versions`."""
        info = await self._stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=timeout)
        self._info = dict(list(self._info.items())[-(KEEP_INFOS - 1) :])
        self._info[info.bundle_version] = info
        return info

    def _versions(self, bundle_version: str) -> dict[str, str]:
        """Encoder and index factory, but only when known for the bundle that answered."""
        info = self._info.get(bundle_version)
        if info is not None:
            return {name: getattr(info, name) for name in RETRIEVAL_VERSION_FIELDS}
        # Retrieval switched bundles since we asked: learn the new info in the background.
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._refresh_info())
        return {}

    async def _refresh_info(self) -> None:
        try:
            await self.index_info(timeout=5.0)
        except grpc.aio.AioRpcError as exc:
            log.info("could not refresh retrieval index info: %s", exc.code().name)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
        await self._channel.close()


class GrpcRankingStage:
    """RankingService over a client channel."""

    def __init__(self, settings: Settings) -> None:
        self.target = settings.ranking_address
        self._channel = ServiceChannel(self.target, settings)

    @property
    def _stub(self) -> ranking_pb2_grpc.RankingServiceStub:
        return self._channel.stub(ranking_pb2_grpc.RankingServiceStub)

    async def rank(
        self,
        context: RankContext,
        candidates: Sequence[Candidate],
        timeout: float,
        version: str = "",
    ) -> RankResult:
        request = convert.rank_request(context, candidates)
        request.bundle_version = version
        try:
            reply = await self._stub.Rank(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc("ranking", self.target, exc) from None
        versions = {
            f.name: getattr(reply.versions, f.name) for f in reply.versions.DESCRIPTOR.fields
        }
        return RankResult(
            [convert.scored_from_proto(s) for s in reply.candidates],
            {name: value for name, value in versions.items() if value},
            reply.cf_folded_in,
        )

    async def recall(
        self,
        user_id: str,
        history: Sequence[str],
        k: int,
        exclude: frozenset[str],
        timeout: float,
        version: str = "",
    ) -> RecallResult:
        request = ranking_pb2.RecallCandidatesRequest(
            user_id=user_id,
            history_item_ids=list(history),
            top_k=k,
            exclude_item_ids=sorted(exclude),
            bundle_version=version,
        )
        try:
            reply = await self._stub.RecallCandidates(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc("ranking", self.target, exc) from None
        return RecallResult(
            [(i.item_id, i.cf_score) for i in reply.items],
            reply.cf_folded_in,
            reply.versions.bundle_version,
        )

    async def close(self) -> None:
        await self._channel.close()
