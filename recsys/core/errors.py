"""The one error taxonomy. Domain code raises these; `recsys.rpc.status` maps them to status codes."""

from __future__ import annotations


class RecsysError(Exception):
    """Base of every error a caller or user can act on; anything else is an internal fault."""


class InvalidInput(RecsysError):
    """Bad request or input file; the message names the field, file, row or value."""


class DataLoss(RecsysError):
    """Data the system itself stored (journal, change log, snapshot, bundle file) is corrupt or
    unreadable: never the caller's fault, and retrying will not help until an operator acts."""


class NotFound(RecsysError):
    """Unknown ids where that matters."""


class Overloaded(RecsysError):
    """Queue or concurrency limit reached."""


class NotReady(RecsysError):
    """Still loading, draining, or a dependency is down."""


class Unauthenticated(RecsysError):
    """The caller proved no identity where one is required (no client certificate, no token)."""


class PermissionDenied(RecsysError):
    """The caller's identity is known but not allowed to do this (e.g. write the catalog)."""


class DeadlineExceeded(RecsysError):
    """The caller's deadline cannot be met."""


class UpstreamError(RecsysError):
    """A service this one called failed with a status that has no error of its own (INTERNAL…)."""

    def __init__(self, service: str, status: str, details: str) -> None:
        super().__init__(f"{service} failed with {status}: {details}")
        self.service = service
        self.status = status


class VersionUnavailable(RecsysError):
    """A request pinned to a bundle version this process does not hold (any more, or yet)."""

    def __init__(self, service: str, wanted: str, held: tuple[str, ...]) -> None:
        holds = ", ".join(held) or "none"
        super().__init__(
            f"{service}: bundle version {wanted!r} is not loaded here (holds: {holds})"
        )
        self.service = service
        self.wanted = wanted
        self.held = held  # live version first, then the previous one while it is kept


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for
    one-line errors and logs."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
