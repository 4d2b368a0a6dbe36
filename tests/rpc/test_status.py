"""recsys.rpc.status: the one mapping between our errors and gRPC status codes, both ways."""

from __future__ import annotations

import grpc
import pytest

from recsys.core.errors import VersionUnavailable
from recsys.rpc.status import error_from_rpc, status_code, trailing_metadata


@pytest.mark.parametrize("wanted", ["20261126T101500Z-3f9a1c", "\x1f", "é,x", ""])
def test_a_pinned_version_survives_the_trip_through_trailing_metadata(wanted: str) -> None:
    sent = VersionUnavailable("ranking", wanted, ("v2", "v,1"))
    trailers = trailing_metadata(sent)
    # gRPC refuses metadata values that are not printable ASCII (the caller chose `wanted`).
    assert all(value.isascii() and value.isprintable() for _, value in trailers)
    failed = grpc.aio.AioRpcError(
        status_code(sent),
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*trailers),
        details=str(sent),
    )
    received = error_from_rpc("ranking", "127.0.0.1:1", failed)
    assert isinstance(received, VersionUnavailable)
    assert (received.wanted, received.held) == (wanted, ("v2", "v,1"))
