"""`recsys catalog upsert|delete`: online changes sent to a live retrieval service, as a writer.

The caller authenticates as the services expect (recsys.rpc.auth): with the settings' client
certificate (mTLS, RECSYS_TLS_* or the flags) or a bearer token read from a file, never from
the command line, where other users could see it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import grpc

from recsys.app.ingest import catalog_items, load_catalog
from recsys.core.errors import InvalidInput, NotReady, UpstreamError
from recsys.core.settings import Settings
from recsys.rpc import convert
from recsys.rpc.tls import ClientCertificates
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc

TIMEOUT_S = 60.0
Metadata = list[tuple[str, str]]
Reply = TypeVar("Reply")


def token_metadata(path: Path | None) -> Metadata:
    """`authorization: Bearer TOKEN` from a file holding the token (None: send none)."""
    if path is None:
        return []
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"--token-file {path}: {exc.strerror or exc}") from None
    if not token or any(c.isspace() for c in token):
        raise InvalidInput(f"--token-file {path}: expected one token and nothing else")
    return [("authorization", f"Bearer {token}")]


@contextmanager
def retrieval_stub(
    address: str, settings: Settings
) -> Iterator[retrieval_pb2_grpc.RetrievalServiceStub]:
    """A stub on `address`: TLS presenting the settings' client certificate when they give one."""
    if settings.tls_enabled():
        certificates = ClientCertificates(settings)
        channel = grpc.secure_channel(
            address, certificates.credentials(), options=certificates.options()
        )
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        yield retrieval_pb2_grpc.RetrievalServiceStub(channel)


def _write(
    method: Callable[..., Reply], request: object, metadata: Metadata, address: str, at: str
) -> Reply:
    """One write RPC; a failure becomes one line naming the service and what was done before:
    NotReady when retrieval cannot be reached (later may work), UpstreamError otherwise."""
    try:
        return method(request, timeout=TIMEOUT_S, metadata=metadata)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.UNAVAILABLE:
            raise NotReady(
                f"retrieval service unavailable at {address}: {details} ({at})"
            ) from None
        raise UpstreamError("retrieval", code.name, f"{details} ({at})") from None


def upsert_catalog(address: str, catalog: Path, settings: Settings, metadata: Metadata) -> int:
    """Sends every item of a catalog file in batches of max_upsert_items; returns how many."""
    items = catalog_items(load_catalog(catalog))
    batch = settings.max_upsert_items
    with retrieval_stub(address, settings) as stub:
        for start in range(0, len(items), batch):
            chunk = items[start : start + batch]
            request = retrieval_pb2.UpsertItemsRequest(
                items=[convert.item_to_proto(i) for i in chunk]
            )
            done = f"{start:,} of {len(items):,} items acknowledged before this batch"
            _write(stub.UpsertItems, request, metadata, address, done)
    return len(items)


def delete_items(
    address: str, item_ids: Sequence[str], settings: Settings, metadata: Metadata
) -> list[str]:
    """Deletes the ids in batches of max_upsert_items; returns the ones retrieval did not hold."""
    batch, missing = settings.max_upsert_items, []
    with retrieval_stub(address, settings) as stub:
        for start in range(0, len(item_ids), batch):
            request = retrieval_pb2.DeleteItemsRequest(
                item_ids=list(item_ids[start : start + batch])
            )
            done = f"{start:,} of {len(item_ids):,} ids deleted before this batch"
            reply = _write(stub.DeleteItems, request, metadata, address, done)
            missing.extend(reply.missing_item_ids)
    return missing
