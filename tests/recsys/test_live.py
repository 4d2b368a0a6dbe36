"""LiveVersions: which version answers, how long the previous one stays, and that a version in
use is never closed under a request."""

from __future__ import annotations

import asyncio

import pytest

from recsys.core.errors import NotReady, VersionUnavailable
from recsys.core.live import LiveVersions

# Long enough that nothing here races it; the test waits for events, not for this.
WAIT_S = 20.0


class Closed:
    def __init__(self) -> None:
        self.names: list[str] = []
        self.event = asyncio.Event()

    async def __call__(self, value: str) -> None:
        self.names.append(value)
        self.event.set()

    async def next(self) -> None:
        await asyncio.wait_for(self.event.wait(), WAIT_S)
        self.event.clear()


async def dropped(live: LiveVersions[str]) -> None:
    while live.previous is not None:
        await asyncio.sleep(0.01)


def test_unpinned_calls_get_the_live_version_and_pinned_ones_the_version_they_name() -> None:
    async def run() -> None:
        closed = Closed()
        live: LiveVersions[str] = LiveVersions("ranking", closed, 60.0, "loading")
        with pytest.raises(NotReady, match="loading"):
            live.pick()
        live.switch("v1", "models-1")
        live.switch("v2", "models-2")
        assert live.held == ("v2", "v1")
        assert live.pick().value == "models-2" and live.pick("v2").value == "models-2"
        assert live.pick("v1").value == "models-1"
        with pytest.raises(VersionUnavailable) as caught:
            live.pick("v0")
        assert caught.value.held == ("v2", "v1") and "'v0' is not loaded" in str(caught.value)
        await live.close()
        assert sorted(closed.names) == ["models-1", "models-2"]

    asyncio.run(run())


def test_the_previous_version_is_closed_after_the_keep_time_and_only_once_idle() -> None:
    async def run() -> None:
        closed = Closed()
        live: LiveVersions[str] = LiveVersions("retrieval", closed, 0.05, "loading")
        live.switch("v1", "index-1")
        with live.use("v1"):  # a request that started on v1 before the switch
            live.switch("v2", "index-2")
            await asyncio.wait_for(dropped(live), WAIT_S)  # no new request may pin it
            await asyncio.sleep(0.2)
            assert closed.names == []  # kept past its time: a request still uses it
        await closed.next()
        assert closed.names == ["index-1"]
        await live.close()

    asyncio.run(run())


def test_a_third_version_closes_the_first_at_once_and_each_version_is_closed_once() -> None:
    async def run() -> None:
        closed = Closed()
        live: LiveVersions[str] = LiveVersions("ranking", closed, 60.0, "loading")
        for n in (1, 2, 3):
            live.switch(f"v{n}", f"models-{n}")
        await closed.next()
        assert closed.names == ["models-1"] and live.held == ("v3", "v2")
        await live.close()
        assert sorted(closed.names) == ["models-1", "models-2", "models-3"]

    asyncio.run(run())
