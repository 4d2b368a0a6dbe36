"""The one mapping between the error taxonomy and gRPC status codes, in both directions."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote

import grpc

from recsys.core.errors import (
    DataLoss,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    NotReady,
    Overloaded,
    PermissionDenied,
    RecsysError,
    Unauthenticated,
    UpstreamError,
    VersionUnavailable,
)

# Trailing metadata of a FAILED_PRECONDITION for a pinned bundle version: what the caller asked
# for and what the server holds (comma-separated, live first), so the caller can pin again.
# Percent-encoded: metadata values must be printable ASCII, and the wanted name is the caller's.
WANTED_KEY = "recsys-bundle-wanted"
HELD_KEY = "recsys-bundle-held"

STATUS: dict[type[RecsysError], grpc.StatusCode] = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    DataLoss: grpc.StatusCode.DATA_LOSS,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    VersionUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The status a server answers for an exception: ours by type, anything else INTERNAL."""
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]  # type: ignore[index]
    return grpc.StatusCode.INTERNAL


def trailing_metadata(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """What the status of `exc` carries besides its message: the versions, for a pinned one."""
    if isinstance(exc, VersionUnavailable):
        held = ",".join(quote(v, safe="") for v in exc.held)
        return ((WANTED_KEY, quote(exc.wanted, safe="")), (HELD_KEY, held))
    return ()


def _metadata(exc: grpc.aio.AioRpcError) -> dict[str, str]:
    pairs: Any = exc.trailing_metadata() or ()  # grpc.aio.Metadata iterates (key, value)
    return {str(k): str(v) for k, v in pairs}


def error_from_rpc(service: str, target: str, exc: grpc.aio.AioRpcError) -> RecsysError:
    """The domain error for a failed call to `service` at `target`, so callers decide on types."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInput(details)  # the service's message already names the field
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"{service} did not answer within the deadline")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(f"{service} overloaded: {details}")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return Unauthenticated(f"{service} at {target}: {details}")
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(f"{service} at {target}: {details}")
    if code == grpc.StatusCode.FAILED_PRECONDITION and HELD_KEY in (meta := _metadata(exc)):
        held = tuple(unquote(v) for v in meta[HELD_KEY].split(",") if v)
        return VersionUnavailable(service, unquote(meta.get(WANTED_KEY, "")), held)
    if code == grpc.StatusCode.UNAVAILABLE:
        return NotReady(f"{service} service unavailable at {target}: {details}")
    return UpstreamError(service, code.name, details)
