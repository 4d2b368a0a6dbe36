"""Dynamic batching: concurrent requests share each cross-encoder forward pass, off the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from recsys.core import metrics
from recsys.core.errors import NotReady, Overloaded

Pair = tuple[str, str]
ScoreFn = Callable[[list[Pair]], np.ndarray]


@dataclass
class _Chunk:
    pairs: list[Pair]
    future: asyncio.Future[np.ndarray] = field(repr=False)


class DynamicBatcher:
    """Queues pairs from many requests and scores up to `max_batch_pairs` at a time in one thread.

    A batch is sent when it is full or when its first pair has waited `max_wait_s`, so a lone
    request pays at most that wait and a busy server fills every forward pass.
    """

    def __init__(
        self, score: ScoreFn, max_batch_pairs: int, max_wait_s: float, max_queue_pairs: int
    ) -> None:
        self._score = score
        self._max_batch = max_batch_pairs
        self._max_wait = max_wait_s
        self._max_queue = max_queue_pairs
        self._queue: asyncio.Queue[_Chunk] = asyncio.Queue()
        self._pending_pairs = 0
        # One thread: the model is the bottleneck and torch already uses every core per call.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cross-encoder")
        self._worker: asyncio.Task[None] | None = None
        # A chunk that did not fit the previous batch; it opens the next one (FIFO fairness).
        self._carry: _Chunk | None = None

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def pending_pairs(self) -> int:
        return self._pending_pairs

    async def submit(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Scores the pairs (in order) as part of whatever batches they land in."""
        if not pairs:
            return np.zeros(0, np.float32)
        if self._worker is None:
            raise NotReady("ranking model is not loaded yet")
        if self._pending_pairs + len(pairs) > self._max_queue:
            raise Overloaded(
                f"ranking queue full ({self._pending_pairs} pairs waiting, limit {self._max_queue}); retry with backoff"
            )
        loop = asyncio.get_running_loop()
        chunks = [
            _Chunk(list(pairs[i : i + self._max_batch]), loop.create_future())
            for i in range(0, len(pairs), self._max_batch)
        ]
        for chunk in chunks:
            self._add_pending(len(chunk.pairs))
            self._queue.put_nowait(chunk)
        try:
            parts = await asyncio.gather(*(c.future for c in chunks))
        finally:
            for chunk in chunks:
                if not chunk.future.done():
                    # Cancelled (deadline): the worker drops it and releases its pending count.
                    chunk.future.cancel()
        return np.concatenate(parts)

    def _add_pending(self, n: int) -> None:
        self._pending_pairs += n
        metrics.RANKING_QUEUE_DEPTH.set(self._pending_pairs)

    async def _next_batch(self) -> list[_Chunk]:
        """Waits for a first chunk, then gathers more until full or the first one waited max_wait."""
        first, self._carry = self._carry, None
        batch = [first if first is not None else await self._queue.get()]
        size = len(batch[0].pairs)
        deadline = time.monotonic() + self._max_wait
        while size < self._max_batch:
            remaining = deadline - time.monotonic()
            try:
                chunk = (
                    self._queue.get_nowait()
                    if remaining <= 0
                    else await asyncio.wait_for(self._queue.get(), remaining)
                )
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if size + len(chunk.pairs) > self._max_batch:
                self._carry = chunk
                break
            batch.append(chunk)
            size += len(chunk.pairs)
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            live = [c for c in batch if not c.future.cancelled()]
            self._add_pending(-sum(len(c.pairs) for c in batch))
            if not live:
                continue
            pairs = [p for c in live for p in c.pairs]
            metrics.RANKING_BATCH_SIZE.observe(len(pairs))
            started = time.perf_counter()
            try:
                scores = await loop.run_in_executor(self._executor, self._score, pairs)
            except Exception as exc:
                for chunk in live:
                    if not chunk.future.done():
                        chunk.future.set_exception(exc)
                continue
            finally:
                metrics.RANKING_INFERENCE.observe(time.perf_counter() - started)
            offset = 0
            for chunk in live:
                n = len(chunk.pairs)
                if not chunk.future.done():
                    chunk.future.set_result(scores[offset : offset + n])
                offset += n
