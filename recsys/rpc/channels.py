"""Client channels to the project's services: message limits, quick reconnects, grpc_client_* metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from recsys.core import metrics
from recsys.core.settings import Settings


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


def client_channel(target: str, settings: Settings) -> grpc.aio.Channel:
    """An insecure aio channel with client metrics and the same message limits."""
    return grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.lb_policy_name", "round_robin"),
            # gRPC's default reconnect backoff grows to 120 s: after a peer restarts, calls would
            # fail fast for up to two minutes. Internal peers are few; retry them often.
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[0]),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS[1]),
        ],
        interceptors=[ClientMetricsInterceptor()],  # type: ignore[list-item]
    )
