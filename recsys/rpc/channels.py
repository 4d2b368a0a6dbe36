"""Client channels to the project's services: message limits, quick reconnects, grpc_client_* metrics,
TLS with a client certificate when the settings give one."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc

from recsys.core import metrics
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from recsys.rpc.tls import ClientCertificates

log = logging.getLogger(__name__)


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Records grpc_client_* for every unary call made through the channel."""

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else method
        finish = metrics.observe_rpc(
            metrics.CLIENT_STARTED, metrics.CLIENT_HANDLED, metrics.CLIENT_HANDLING, name
        )
        try:
            call = await continuation(client_call_details, request)
            code = await call.code()
        except asyncio.CancelledError:
            finish(grpc.StatusCode.CANCELLED.name)
            raise
        except grpc.aio.AioRpcError as exc:
            finish(exc.code().name)
            raise
        finish(code.name)
        return call


RECONNECT_BACKOFF_MS = (250, 2000)  # first and longest wait before reconnecting to a stage
# With TLS on: how often a ServiceChannel looks at its certificate files, and how long a
# replaced channel may finish the calls it carries.
TLS_CHECK_S = 10.0
RETIRE_GRACE_S = 30.0


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    """Arguments of every client channel: message limits, round robin, quick reconnects."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.lb_policy_name", "round_robin"),
        # gRPC's default reconnect backoff grows to 120 s: after a peer restarts, calls would
        # fail fast for up to two minutes. Internal peers are few; retry them often.
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
    ]


def client_channel(
    target: str, settings: Settings, certificates: ClientCertificates | None = None
) -> grpc.aio.Channel:
    """An aio channel with client metrics and the same message limits; TLS with `certificates`."""
    interceptors: Any = [ClientMetricsInterceptor()]
    options = channel_options(settings)
    if certificates is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(
        target,
        certificates.credentials(),
        options=options + certificates.options(),
        interceptors=interceptors,
    )


Stub = TypeVar("Stub")


class ServiceChannel:
    """The channel to one service, plaintext or TLS as the settings say.

    gRPC fixes a channel's client certificate when the channel is made, so with TLS on a new
    channel replaces this one once the certificate files change (checked every TLS_CHECK_S).
    """

    def __init__(self, target: str, settings: Settings) -> None:
        self.target = target
        self._settings = settings
        self._certificates = ClientCertificates(settings) if settings.tls_enabled() else None
        self._channel = client_channel(target, settings, self._certificates)
        self._stubs: dict[Callable[[grpc.aio.Channel], Any], Any] = {}
        self._next_check = time.monotonic() + TLS_CHECK_S
        self._retiring: dict[asyncio.Task[None], grpc.aio.Channel] = {}

    def stub(self, factory: Callable[[grpc.aio.Channel], Stub]) -> Stub:
        """`factory(channel)` on the current channel, made once per channel."""
        self._renew_if_rotated()
        stub = self._stubs.get(factory)
        if stub is None:
            stub = self._stubs[factory] = factory(self._channel)
        return cast(Stub, stub)

    def _renew_if_rotated(self) -> None:
        if self._certificates is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + TLS_CHECK_S
        if not self._certificates.changed():
            return
        try:
            channel = client_channel(self.target, self._settings, self._certificates)
        except InvalidInput as exc:
            log.warning(
                "client TLS files changed but cannot be used (%s); keeping the channel", exc
            )
            return
        old, self._channel, self._stubs = self._channel, channel, {}
        task = asyncio.get_running_loop().create_task(old.close(RETIRE_GRACE_S))
        self._retiring[task] = old
        task.add_done_callback(lambda done: self._retiring.pop(done, None))
        log.info("TLS client certificate for %s reloaded", self.target)

    async def close(self) -> None:
        """Closes the channel, and at once any replaced one still finishing its calls."""
        for task, old in list(self._retiring.items()):
            task.cancel()
            await old.close(None)
        await self._channel.close(None)
