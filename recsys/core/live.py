"""The bundle version a service answers with, and the previous one kept for pinned requests.

A hot swap loads the new version beside the live one, then `switch` makes it live in one step
on the event loop. Requests take a version with `use` when they start and keep it to the end,
so in-flight ones finish on the version they started with. The previous version answers
requests pinned to it (the gateway pins a request to the version its first answer came from)
for `keep_previous_s`, and is closed once no request uses it any more.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from recsys.core.errors import NotReady, VersionUnavailable

log = logging.getLogger(__name__)

T = TypeVar("T")

# How often a retired version is checked for requests still using it.
IDLE_POLL_S = 0.05


@dataclass(eq=False)
class Loaded(Generic[T]):
    """One loaded bundle version and how many requests are using it now."""

    version: str
    value: T
    in_use: int = 0
    retired: bool = False  # dropped from the service: being closed, or closed


class LiveVersions(Generic[T]):
    """The live version and the previous one; touched only from the event loop's thread."""

    def __init__(
        self,
        service: str,
        close: Callable[[T], Awaitable[None]],
        keep_previous_s: float,
        loading: str,
    ) -> None:
        self.service = service
        self.current: Loaded[T] | None = None
        self.previous: Loaded[T] | None = None
        self._close = close
        self._keep_previous_s = keep_previous_s
        self._loading = loading  # the NotReady message before the first version is live
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def held(self) -> tuple[str, ...]:
        """The versions a pinned request may ask for: the live one first."""
        return tuple(x.version for x in (self.current, self.previous) if x is not None)

    def pick(self, version: str = "") -> Loaded[T]:
        """The live version, or the one a pinned request names when it is held here."""
        current = self.current
        if current is None:
            raise NotReady(self._loading)
        if not version or version == current.version:
            return current
        if self.previous is not None and self.previous.version == version:
            return self.previous
        raise VersionUnavailable(self.service, version, self.held)

    @contextlib.contextmanager
    def use(self, version: str = "") -> Iterator[Loaded[T]]:
        """`pick`, marked in use until the block ends, so it is not closed under the request."""
        loaded = self.pick(version)
        loaded.in_use += 1
        try:
            yield loaded
        finally:
            loaded.in_use -= 1

    def switch(self, version: str, value: T) -> None:
        """Makes `value` the live version; the live one becomes the previous one (kept for
        `keep_previous_s`) and the one before it is closed once idle."""
        displaced, self.previous = self.previous, self.current
        self.current = Loaded(version, value)
        if displaced is not None:
            self._spawn(self._retire(displaced, 0.0))
        if self.previous is not None:
            self._spawn(self._retire(self.previous, self._keep_previous_s))

    async def close(self) -> None:
        """Stops pending retirements and closes every version held (the server has drained)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        held = [x for x in (self.current, self.previous) if x is not None]
        self.current = self.previous = None
        for loaded in held:
            await self._close(loaded.value)

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _retire(self, loaded: Loaded[T], after_s: float) -> None:
        """Drops `loaded` after `after_s` (unless it is live again), then closes it once idle."""
        await asyncio.sleep(after_s)
        if loaded is self.current or loaded.retired:
            return
        loaded.retired = True
        if loaded is self.previous:
            self.previous = None
        while loaded.in_use:
            await asyncio.sleep(IDLE_POLL_S)
        try:
            await self._close(loaded.value)
        except Exception:
            log.exception("%s: closing bundle %s failed", self.service, loaded.version)
            return
        log.info("%s: closed bundle %s", self.service, loaded.version)
