"""The one error taxonomy: domain code raises these; serving maps them to gRPC status codes here."""

from __future__ import annotations

import grpc


class RecsysError(Exception):
    """Base of every error a caller or user can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(RecsysError):
    """Bad request or input file; the message names the field, file, row or value."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(RecsysError):
    """Unknown ids where that matters."""

    code = grpc.StatusCode.NOT_FOUND


class Overloaded(RecsysError):
    """Queue or concurrency limit reached."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReady(RecsysError):
    """Still loading, draining, or a dependency is down."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(RecsysError):
    """The caller's deadline cannot be met."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


def status_code(exc: BaseException) -> grpc.StatusCode:
    """The gRPC status for an exception: ours map by type, anything else is INTERNAL."""
    if isinstance(exc, RecsysError):
        return exc.code
    return grpc.StatusCode.INTERNAL
