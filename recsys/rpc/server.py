"""gRPC server bootstrap shared by the three services: health, reflection, metrics, limits, drain.

Every unary recsys RPC passes through ErrorAndMetricsInterceptor, which decodes the request,
enforces the concurrency limit, lets writes through only for allowed callers (recsys.rpc.auth),
maps errors to status codes (recsys.rpc.status) and records grpc_server_* with the code sent.
TLS (recsys.rpc.tls) is on when the settings name a certificate, else the port is plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, runtime_checkable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from recsys.core import metrics
from recsys.core.bundle import current_version
from recsys.core.errors import InvalidInput, RecsysError
from recsys.core.settings import Settings
from recsys.rpc.auth import WriteAuthorizer
from recsys.rpc.status import status_code, trailing_metadata
from recsys.rpc.tls import server_credentials

log = logging.getLogger(__name__)


class Service(Protocol):
    """What a service package hands to `serve`: its servicer and how to load its bundle."""

    name: str  # short name: retrieval, ranking, gateway
    full_name: str  # proto service name, e.g. recsys.v1.RetrievalService

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def load(self) -> str:
        """Loads models/index (off the event loop) and returns the bundle version."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class Reloadable(Protocol):
    """A service that can switch bundle versions while it serves (retrieval, ranking)."""

    name: str

    async def reload(self, version: str) -> None:
        """Loads `version` beside the live one, off the event loop, then makes it live; raises
        (and keeps the live one) when it cannot be loaded."""
        ...


class ErrorAndMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Decodes requests, authorizes writes, maps exceptions to status codes, limits concurrency,
    records metrics."""

    def __init__(self, max_concurrent_rpcs: int, writes: WriteAuthorizer) -> None:
        self._limit = max_concurrent_rpcs
        self._in_flight = 0
        self._writes = writes

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        # Health and reflection (streaming) pass through untouched.
        if handler is None or handler.unary_unary is None or not method.startswith("/recsys."):
            return handler
        inner: Any = handler.unary_unary
        decode: Any = handler.request_deserializer

        async def behavior(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
            finish = metrics.observe_rpc(
                metrics.SERVER_STARTED, metrics.SERVER_HANDLED, metrics.SERVER_HANDLING, method
            )
            if self._in_flight >= self._limit:
                finish(grpc.StatusCode.RESOURCE_EXHAUSTED.name)
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"server overloaded: {self._limit} concurrent RPCs in flight; retry with backoff",
                )
            self._in_flight += 1
            try:
                self._writes.check(method, context)  # before decoding: strangers learn nothing
                response = await inner(_decode(decode, raw, method), context)
            except RecsysError as exc:
                code, message, trailers = status_code(exc), str(exc), trailing_metadata(exc)
            except asyncio.CancelledError:
                finish(grpc.StatusCode.CANCELLED.name)
                raise
            except grpc.aio.AbortError:
                finish((context.code() or grpc.StatusCode.UNKNOWN).name)
                raise
            except Exception:
                log.exception("unhandled error in %s", method)
                code = grpc.StatusCode.INTERNAL
                message = f"internal error in {method}; see the server log"
                trailers = ()
            else:
                finish(grpc.StatusCode.OK.name)
                return response
            finally:
                self._in_flight -= 1
            # Counted before the status leaves, so a scrape right after the answer sees it.
            finish(code.name)
            await context.abort(code, message, trailers)

        # Requests arrive as bytes and are decoded inside `behavior`: gRPC would answer a body
        # that fails to parse with UNKNOWN, and the caller's mistake deserves INVALID_ARGUMENT.
        return grpc.unary_unary_rpc_method_handler(
            behavior, request_deserializer=None, response_serializer=handler.response_serializer
        )


def _decode(decode: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    """The request message, or InvalidInput when the bytes are not one."""
    try:
        return decode(raw)
    except Exception:
        raise InvalidInput(
            f"request body: {len(raw)} bytes that do not parse as the request of {method}"
        ) from None


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """Channel arguments every server uses: message limits, one owner a port, a max connection age."""
    options = [
        # gRPC shares ports by default (SO_REUSEPORT): a second server on a taken port would
        # silently split its traffic instead of failing to start.
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
    ]
    if settings.max_connection_age_s > 0:
        # Clients reconnect periodically, so pods added by a scale-up get traffic.
        options += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_period_s * 1000)),
        ]
    return options


def _set_health(servicer: health_aio.HealthServicer, names: list[str], serving: bool) -> Any:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    return asyncio.gather(*(servicer.set(name, status) for name in names))


def _listen(server: grpc.aio.Server, address: str, settings: Settings, name: str) -> None:
    """Binds the gRPC port: TLS when the settings give a certificate, else plaintext."""
    credentials = server_credentials(settings)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError:  # grpc's "Failed to bind", with the reason only at debug verbosity
        raise InvalidInput(f"{name}: cannot listen on {address} (in use?)") from None
    if credentials is None:
        log.warning("%s: PLAINTEXT on %s: callers are not authenticated", name, address)
    else:
        who = (
            "client certificate required (mTLS)"
            if settings.tls_client_auth
            else "no client certificate"
        )
        log.info("%s: TLS on %s, %s", name, address, who)


async def _health_only_server(
    servicer: health_aio.HealthServicer, settings: Settings, port: int, name: str
) -> grpc.aio.Server:
    """A plaintext server with nothing but health, for probes that cannot do mTLS (kubelet)."""
    server = grpc.aio.server(options=server_options(settings))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{settings.host}:{port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError:
        await server.stop(None)
        raise InvalidInput(f"{name}: cannot listen for health on {address} (in use?)") from None
    await server.start()
    log.info("%s: health only, plaintext, on %s", name, address)
    return server


def _start_metrics(host: str, port: int, name: str) -> None:
    try:
        start_http_server(port, addr=host)
    except OSError as exc:
        raise InvalidInput(
            f"{name}: cannot serve metrics on {host}:{port}: {exc.strerror}"
        ) from None


async def serve(
    service: Service,
    settings: Settings,
    port: int,
    metrics_port: int,
    stop: asyncio.Event,
    health_port: int = 0,
) -> None:
    """Runs one service until `stop` is set, then drains for the grace period."""
    writes = WriteAuthorizer(settings)
    server = grpc.aio.server(
        interceptors=[ErrorAndMetricsInterceptor(settings.max_concurrent_rpcs, writes)],
        options=server_options(settings),
    )
    service.add_to_server(server)
    health_servicer = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = ["", service.full_name]
    await _set_health(health_servicer, names, serving=False)
    reflection.enable_server_reflection(
        [service.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{port}"
    try:
        _listen(server, address, settings, service.name)
        await server.start()
        if metrics_port:
            _start_metrics(settings.host, metrics_port, service.name)
        health_server = (
            await _health_only_server(health_servicer, settings, health_port, service.name)
            if health_port
            else None
        )
    except InvalidInput:
        await server.stop(None)  # a port in use: one line and exit, no half-started server
        raise
    log.info(
        "%s listening on %s, metrics on :%s/metrics, limits %s",
        service.name,
        address,
        metrics_port,
        settings.limits() | {"max_message_bytes": settings.max_message_bytes},
    )
    if writes.guards(service.full_name):
        log.log(
            logging.INFO if writes.policy.configured else logging.WARNING,
            "%s: %s",
            service.name,
            writes.describe(),
        )
    metrics.SERVING.labels(service=service.name).set(0)
    load = asyncio.create_task(service.load())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({load, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if load in done:
        try:
            version = load.result()  # a failed load raises here and the process exits non-zero
        except BaseException:
            # Stopped here, not by the garbage collector after the loop has closed (a traceback).
            await server.stop(None)
            if health_server is not None:
                await health_server.stop(None)
            await service.close()
            raise
        metrics.init_bundle_metrics(service.name)
        metrics.set_bundle_version(service.name, version)
        metrics.BUNDLE_LOADED.labels(service=service.name).set_to_current_time()
        await _set_health(health_servicer, names, serving=True)
        metrics.SERVING.labels(service=service.name).set(1)
        log.info("%s serving bundle %s", service.name, version)
        watcher = None
        if isinstance(service, Reloadable) and settings.bundle and settings.bundle_poll_s > 0:
            watcher = asyncio.create_task(watch_bundle(service, settings, version))
        await stop.wait()
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    else:
        load.cancel()
    await _set_health(health_servicer, names, serving=False)
    metrics.SERVING.labels(service=service.name).set(0)
    if load in done and settings.drain_delay_s > 0:
        # Still answering, but NOT_SERVING: whoever routes by health moves away first.
        log.info("%s NOT_SERVING; answering for %.1fs more", service.name, settings.drain_delay_s)
        await asyncio.sleep(settings.drain_delay_s)
    log.info("%s draining for up to %.1fs", service.name, settings.grace_period_s)
    await server.stop(settings.grace_period_s)
    if health_server is not None:
        await health_server.stop(None)
    await service.close()
    log.info("%s stopped", service.name)


async def watch_bundle(service: Reloadable, settings: Settings, live: str) -> None:
    """Reads CURRENT every `bundle_poll_s` and hot-swaps to the version it names. Health stays
    SERVING throughout; a version that fails to load is logged and counted, the live one keeps
    serving, and it is not tried again until CURRENT names another version."""
    assert settings.bundle is not None
    name = service.name
    failed: str | None = None
    unreadable = False  # warned that CURRENT cannot be read (said once, not every poll)
    while True:
        await asyncio.sleep(settings.bundle_poll_s)
        try:
            wanted = current_version(settings.bundle)
        except InvalidInput as exc:
            if not unreadable:
                log.warning("%s: %s; bundle %s keeps serving", name, exc, live)
            unreadable = True
            continue
        unreadable = False
        if wanted in (live, failed):
            continue
        log.info("%s: CURRENT names bundle %s; loading it beside %s", name, wanted, live)
        started = time.monotonic()
        try:
            await service.reload(wanted)
        except Exception as exc:
            failed = wanted
            metrics.BUNDLE_LOAD_FAILURES.labels(service=name).inc()
            log.error(
                "%s: bundle %s failed to load (%s); bundle %s keeps serving",
                name,
                wanted,
                exc if isinstance(exc, RecsysError) else repr(exc),
                live,
            )
            log.debug("%s: loading bundle %s", name, wanted, exc_info=True)
            continue
        failed, live = None, wanted
        metrics.set_bundle_version(name, live)
        metrics.BUNDLE_LOADED.labels(service=name).set_to_current_time()
        log.info(
            "%s: now serving bundle %s (loaded in %.1fs)", name, live, time.monotonic() - started
        )


def run(
    service: Service, settings: Settings, port: int, metrics_port: int, health_port: int = 0
) -> None:
    """Entry point of a service process: serves until SIGTERM/SIGINT, then drains."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve(service, settings, port, metrics_port, stop, health_port)

    asyncio.run(main())
