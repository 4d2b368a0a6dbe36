"""The retrieval gRPC edge: validate protos, call the Retriever off the event loop, build replies."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import grpc
import numpy as np

from recsys.core import metrics
from recsys.core.bundle import Bundle
from recsys.core.domain import Item, SearchQuery
from recsys.core.errors import InvalidInput, RecsysError, VersionUnavailable
from recsys.core.live import LiveVersions
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.backends import backend_opener
from retrieval_service.changelog import ChangeLog
from retrieval_service.retriever import HistoryWeights, HybridSettings, Retriever

log = logging.getLogger(__name__)
T = TypeVar("T")


def search_query(msg: retrieval_pb2.SearchRequest, settings: Settings) -> SearchQuery:
    """Validates a SearchRequest against the limits; InvalidInput names the field."""
    top_k = msg.top_k or settings.default_k
    if not 1 <= top_k <= settings.max_k:
        raise InvalidInput(f"top_k: {msg.top_k} is outside 1..{settings.max_k}")
    if len(msg.query_text) > settings.max_text_chars:
        raise InvalidInput(
            f"query_text: {len(msg.query_text)} chars, limit {settings.max_text_chars}"
        )
    if len(msg.history_item_ids) > settings.max_history_items:
        raise InvalidInput(
            f"history_item_ids: {len(msg.history_item_ids)} ids, limit {settings.max_history_items}"
        )
    vector = np.asarray(msg.query_vector, dtype=np.float32) if len(msg.query_vector) else None
    if vector is not None and not np.isfinite(vector).all():
        raise InvalidInput("query_vector: contains NaN or infinity")
    if not (msg.query_text.strip() or vector is not None or len(msg.history_item_ids)):
        raise InvalidInput("query_text, query_vector, history_item_ids: give at least one")
    return SearchQuery(
        top_k=top_k,
        text=msg.query_text.strip(),
        vector=vector,
        history_item_ids=tuple(msg.history_item_ids),
        categories=frozenset(msg.filter.categories),
        exclude_item_ids=frozenset(msg.filter.exclude_item_ids),
        include_text=msg.include_text,
        include_vectors=msg.include_vectors,
        new_items_only=msg.new_items_only,
    )


def upsert_items(msg: retrieval_pb2.UpsertItemsRequest, settings: Settings) -> list[Item]:
    """Validates an upsert: ids and titles present, no duplicates, texts within the limit."""
    if not msg.items:
        raise InvalidInput("items: empty; give at least one item")
    if len(msg.items) > settings.max_upsert_items:
        raise InvalidInput(f"items: {len(msg.items)} items, limit {settings.max_upsert_items}")
    items, seen = [], set()
    for i, proto in enumerate(msg.items):
        item = convert.item_from_proto(proto)
        if not item.item_id:
            raise InvalidInput(f"items[{i}].item_id: required")
        if not item.title:
            raise InvalidInput(f"items[{i}].title: required (item {item.item_id!r})")
        if item.item_id in seen:
            raise InvalidInput(f"items[{i}].item_id: {item.item_id!r} appears twice in the request")
        if len(item.text()) > settings.max_text_chars:
            raise InvalidInput(
                f"items[{i}]: text of {item.item_id!r} is {len(item.text())} chars, limit {settings.max_text_chars}"
            )
        seen.add(item.item_id)
        items.append(item)
    return items


def item_ids(ids: Sequence[str], field: str, limit: int) -> list[str]:
    if not ids:
        raise InvalidInput(f"{field}: empty; give at least one id")
    if len(ids) > limit:
        raise InvalidInput(f"{field}: {len(ids)} ids, limit {limit}")
    for i, item_id in enumerate(ids):
        if not item_id.strip():
            raise InvalidInput(f"{field}[{i}]: empty id")
    return [i.strip() for i in ids]


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServiceServicer):
    """Proto in → validated domain request → Retriever (in a worker thread) → proto out.

    Reads use the version they pin (or the live one) from start to end; writes go to the live
    version (one switched away from mid-call passes them on), which keeps the previous one's
    copy up to date for pinned searches.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.live: LiveVersions[Retriever] = LiveVersions(
            "retrieval",
            _close_retriever,
            settings.bundle_keep_previous_s,
            "retrieval is loading its bundle; retry shortly",
        )

    async def Search(
        self, request: retrieval_pb2.SearchRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.SearchResponse:
        with self.live.use(request.bundle_version) as loaded:
            query = search_query(request, self.settings)
            hits, unknown = await asyncio.to_thread(loaded.value.search, query)
        return retrieval_pb2.SearchResponse(
            hits=[convert.hit_to_proto(h) for h in hits],
            bundle_version=loaded.version,
            unknown_history_item_ids=unknown,
        )

    async def GetItems(
        self, request: retrieval_pb2.GetItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetItemsResponse:
        with self.live.use(request.bundle_version) as loaded:
            ids = item_ids(request.item_ids, "item_ids", self.settings.max_k)
            found, missing = await asyncio.to_thread(loaded.value.get_items, ids)
        return retrieval_pb2.GetItemsResponse(
            items=[
                retrieval_pb2.ItemRecord(
                    item=convert.item_to_proto(item),
                    text=item.text(),
                    vector=vector.tolist() if request.include_vectors else [],
                )
                for item, vector in found
            ],
            missing_item_ids=missing,
            bundle_version=loaded.version,
        )

    async def UpsertItems(
        self, request: retrieval_pb2.UpsertItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.UpsertItemsResponse:
        with self.live.use() as loaded:
            items = upsert_items(request, self.settings)
            size = await asyncio.to_thread(loaded.value.upsert, items)
        await asyncio.to_thread(observe, self.live.pick().value)
        return retrieval_pb2.UpsertItemsResponse(upserted=len(items), index_size=size)

    async def DeleteItems(
        self, request: retrieval_pb2.DeleteItemsRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.DeleteItemsResponse:
        with self.live.use() as loaded:
            ids = item_ids(request.item_ids, "item_ids", self.settings.max_upsert_items)
            deleted, missing = await asyncio.to_thread(loaded.value.delete, ids)
        # The live version's size, should it have switched meanwhile.
        size = await asyncio.to_thread(observe, self.live.pick().value)
        return retrieval_pb2.DeleteItemsResponse(
            deleted=len(deleted), missing_item_ids=missing, index_size=size
        )

    async def GetIndexInfo(
        self, request: retrieval_pb2.GetIndexInfoRequest, context: grpc.aio.ServicerContext
    ) -> retrieval_pb2.GetIndexInfoResponse:
        info = await asyncio.to_thread(self.live.pick().value.info)  # Milvus: a count query
        return retrieval_pb2.GetIndexInfoResponse(**info)


async def _close_retriever(retriever: Retriever) -> None:
    retriever.close()


def observe(live: Retriever) -> int:
    """Exports the live version's size and change log position; returns the size (blocking:
    with Milvus a count query)."""
    size = len(live.catalog)
    metrics.INDEX_ITEMS.set(size)
    metrics.CHANGE_LOG_APPLIED.set(live.position)
    return size


class RetrievalService:
    """The retrieval process: servicer plus bundle loading and hot swaps (see
    recsys.rpc.server.Service and Reloadable)."""

    name = "retrieval"
    full_name = "recsys.v1.RetrievalService"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servicer = RetrievalServicer(settings)
        self.change_log: ChangeLog | None = None
        # Waits on the log and catch-ups run here, not in the pool that serves requests.
        self._log_thread = ThreadPoolExecutor(1, thread_name_prefix="change-log")
        self._follower: asyncio.Task[None] | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        retrieval_pb2_grpc.add_RetrievalServiceServicer_to_server(self.servicer, server)

    async def load(self) -> str:
        if self.settings.bundle is None:
            raise InvalidInput("--bundle (RECSYS_BUNDLE) is required")
        bundle = Bundle.open(self.settings.bundle)
        history = HistoryWeights(self.settings.history_half_life, self.settings.history_weight)
        if self.settings.change_log_url:
            self.change_log = await self._in_log_thread(
                ChangeLog, self.settings.change_log_url, self.settings.change_log_table
            )
        # Off the event loop: a backend's module (its client library) is imported here.
        backend = await asyncio.to_thread(backend_opener, self.settings)
        retriever = await asyncio.to_thread(
            Retriever.load,
            bundle,
            None if self.change_log else self.settings.state_path(),
            self.settings.device,
            history,
            self.settings.journal_compact_records,
            self.change_log,
            backend,
            HybridSettings(self.settings.lexical_retrieval, self.settings.hybrid_rrf_k),
        )
        self.servicer.live.switch(bundle.version, retriever)
        await asyncio.to_thread(observe, retriever)
        if self.change_log is not None:
            log.info(
                "retrieval follows change log %s from position %d",
                self.change_log.name,
                retriever.position,
            )
            self._follower = asyncio.create_task(self._follow(self.change_log))
        return bundle.version

    async def _follow(self, change_log: ChangeLog) -> None:
        """Applies new change log records to every version held (the live one and a previous
        one kept for pinned reads) when notified of a commit, or every change_log_poll_s. While
        the log cannot be read, the replica keeps answering from what it has applied, counts
        the failures and logs once per outage."""
        poll = self.settings.change_log_poll_s
        failing = False
        while True:
            try:
                await self._in_log_thread(change_log.wait, poll)
                for version in self.servicer.live.held:
                    try:
                        held = self.servicer.live.pick(version).value
                    except VersionUnavailable:
                        continue  # retired meanwhile
                    await self._in_log_thread(held.catch_up)
                head = await self._in_log_thread(change_log.head)
            except Exception as exc:  # the follower must outlive any failure, and say so
                metrics.CHANGE_LOG_ERRORS.inc()
                if not failing:
                    log.warning(
                        "retrieval: %s; answering from position %d until the change log can be "
                        "applied again",
                        exc if isinstance(exc, RecsysError) else repr(exc),
                        self.servicer.live.pick().value.position,
                    )
                failing = True
                await asyncio.sleep(poll)
                continue
            if failing:
                log.info("retrieval: change log %s can be read again", change_log.name)
            failing = False
            metrics.CHANGE_LOG_HEAD.set(head)
            await self._in_log_thread(observe, self.servicer.live.pick().value)

    async def _in_log_thread(self, work: Callable[..., T], *args: object) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._log_thread, work, *args)

    async def reload(self, version: str) -> None:
        """Loads `version` with the online changes beside the live one (which keeps serving and
        taking writes), hands the state dir over, and makes it live."""
        assert self.settings.bundle is not None
        bundle = Bundle.open(self.settings.bundle, version)
        live = self.servicer.live.pick().value
        retriever = await asyncio.to_thread(live.successor, bundle, self.settings.device)
        self.servicer.live.switch(version, retriever)
        await asyncio.to_thread(observe, retriever)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
        await self.servicer.live.close()
        self._log_thread.shutdown(wait=True, cancel_futures=True)
        if self.change_log is not None:
            self.change_log.close()
