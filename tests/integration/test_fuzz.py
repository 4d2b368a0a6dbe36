"""Property-based fuzzing of every RPC of the three services, real processes on loopback.

Requests are generated from the proto descriptors, so a new field or RPC is fuzzed without
touching this file. Every well-typed request gets an answer or a client-error status, never
UNKNOWN or INTERNAL, and every service is still SERVING afterwards. Bytes that are no request
at all get INVALID_ARGUMENT. `pytest --hypothesis-profile=full` runs many more examples.
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import given
from hypothesis import strategies as st

from recsys.rpc.launcher import FULL_NAMES, SERVICES, Launcher
from recsys.v1 import gateway_pb2, ranking_pb2, retrieval_pb2

DESCRIPTORS = {
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
    "ranking": ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
    "retrieval": retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"],
}
METHODS = [(name, m) for name, service in DESCRIPTORS.items() for m in service.methods]
# What a caller may get back for a well-typed request: an answer, or a status that says what
# to change or when to retry. UNKNOWN and INTERNAL would be the server's own fault.
ACCEPTABLE = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    # A request pinned to a bundle_version the service does not hold (the reply says which).
    grpc.StatusCode.FAILED_PRECONDITION,
}
CALL_TIMEOUT_S = 30.0
MAX_DEPTH = 3  # nested messages below this are left unset

_INTEGERS = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _small_or_any(low: int, high: int) -> st.SearchStrategy[int]:
    """Mostly values near the limits a caller would send, sometimes any value of the type."""
    return st.one_of(st.integers(max(low, -5), min(high, 1200)), st.integers(low, high))


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = field.type
    if kind in _INTEGERS:
        return _small_or_any(*_INTEGERS[kind])
    if kind == FieldDescriptor.TYPE_STRING:
        return st.text(max_size=40)
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=20)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)  # NaN and infinities included
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers arrive too.
        return st.one_of(
            st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 50)
        )
    raise AssertionError(f"no strategy for {field.full_name} (type {kind})")


def field_values(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    """Values for one field as the generated message constructor takes them (None: skip)."""
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        entry = field.message_type
        if entry.GetOptions().map_entry:
            key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
            return st.dictionaries(scalar(key), scalar(value), max_size=4)
        if depth >= MAX_DEPTH:
            return None
        single: st.SearchStrategy[Any] = messages(entry, depth + 1)
    else:
        single = scalar(field)
    if field.is_repeated:
        return st.lists(single, max_size=6)
    return single


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Well-typed messages of `descriptor`: any subset of its fields, any values of their types."""
    cls = GetMessageClass(descriptor)
    optional = {
        f.name: values for f in descriptor.fields if (values := field_values(f, depth)) is not None
    }
    return st.fixed_dictionaries({}, optional=optional).map(lambda kw: cls(**kw))


def call(stack: Launcher, service: str, method: MethodDescriptor, body: bytes) -> grpc.StatusCode:
    """Sends raw request bytes to one RPC; returns the status code it ended with."""
    with grpc.insecure_channel(stack.address(service)) as channel:
        rpc = channel.unary_unary(
            f"/{FULL_NAMES[service]}/{method.name}",
            request_serializer=None,
            response_deserializer=None,
        )
        try:
            rpc(body, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                assert exc.details(), "INVALID_ARGUMENT must say which field"  # type: ignore[attr-defined]
            if code == grpc.StatusCode.FAILED_PRECONDITION:
                assert "bundle version" in exc.details(), exc.details()  # type: ignore[attr-defined]
            return code
    return grpc.StatusCode.OK


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_well_typed_requests_never_get_unknown_or_internal(
    stack: Launcher, service: str, method: MethodDescriptor
) -> None:
    seen: set[grpc.StatusCode] = set()

    @given(request=messages(method.input_type))
    def check(request: Message) -> None:
        code = call(stack, service, method, request.SerializeToString())
        seen.add(code)
        assert code in ACCEPTABLE, f"{method.full_name} answered {code.name} to {request!r}"

    check()
    # Every service survived the whole run.
    for name in SERVICES:
        assert stack.health(name) == 1, f"{name} no longer SERVING after fuzzing {method.name}"
    assert seen, "no request was sent"


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s}.{m.name}" for s, m in METHODS])
def test_bytes_that_are_no_request_get_invalid_argument(
    stack: Launcher, service: str, method: MethodDescriptor
) -> None:
    garbage = b"\xff\xff\xff\xff"
    with pytest.raises(DecodeError):  # really not a message of this type
        GetMessageClass(method.input_type).FromString(garbage)
    assert call(stack, service, method, garbage) == grpc.StatusCode.INVALID_ARGUMENT
