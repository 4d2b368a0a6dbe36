"""Dynamic batching: concurrent requests share forward passes, keep their order, and overload is refused."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from ranking_service.batching import DynamicBatcher
from recsys.core.errors import Overloaded


def length_scores(pairs: list[tuple[str, str]]) -> np.ndarray:
    return np.array([len(a) * 100 + len(b) for a, b in pairs], dtype=np.float32)


def test_concurrent_requests_share_batches_and_keep_order() -> None:
    calls: list[int] = []
    loop_threads: set[int] = set()

    def score(pairs: list[tuple[str, str]]) -> np.ndarray:
        calls.append(len(pairs))
        loop_threads.add(threading.get_ident())
        return length_scores(pairs)

    async def main() -> list[np.ndarray]:
        batcher = DynamicBatcher(score, max_batch_pairs=16, max_wait_s=0.05, max_queue_pairs=1000)
        batcher.start()
        requests = [[("q" * i, "d" * j) for j in range(5)] for i in range(1, 7)]
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            await batcher.close()

    main_thread = threading.get_ident()
    results = asyncio.run(main())
    for i, result in enumerate(results, start=1):
        np.testing.assert_array_equal(result, [i * 100 + j for j in range(5)])
    assert sum(calls) == 30 and max(calls) <= 16
    assert len(calls) < 6, "requests were not batched together"
    assert main_thread not in loop_threads, "the model ran on the event loop's thread"


def test_a_full_queue_is_refused_with_overloaded() -> None:
    busy = threading.Event()  # set when the model has started on a batch
    release = threading.Event()  # lets the model finish

    def slow(pairs: list[tuple[str, str]]) -> np.ndarray:
        busy.set()
        if not release.wait(60):
            raise TimeoutError("the test never released the model")
        return length_scores(pairs)

    async def main() -> None:
        batcher = DynamicBatcher(slow, max_batch_pairs=4, max_wait_s=0.0, max_queue_pairs=8)
        batcher.start()
        try:
            running = asyncio.create_task(batcher.submit([("a", "b")] * 4))
            # The worker has taken the first batch off the queue: the model is busy with it.
            assert await asyncio.to_thread(busy.wait, 60)
            assert batcher.pending_pairs == 0
            waiting = asyncio.create_task(batcher.submit([("a", "b")] * 8))
            await asyncio.sleep(0)  # one step: submit queues its pairs before its first await
            assert batcher.pending_pairs == 8 and not waiting.done()
            # Refused at once: a request that was queued instead would wait for the model.
            refused = asyncio.create_task(batcher.submit([("a", "b")]))
            await asyncio.sleep(0)
            assert refused.done(), "a full batcher queued the request instead of refusing it"
            with pytest.raises(Overloaded, match="queue full"):
                refused.result()
            assert batcher.pending_pairs == 8  # the refused request left nothing behind
            release.set()
            assert len(await running) == 4 and len(await waiting) == 8
            assert batcher.pending_pairs == 0
        finally:
            release.set()
            await batcher.close()

    asyncio.run(main())
