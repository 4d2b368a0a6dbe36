"""A client that knows only the .proto files, or only reflection, can call every RPC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from recsys.app.codegen import PROTO_ROOT, proto_files
from recsys.rpc.launcher import FULL_NAMES, Launcher

# One valid JSON request per RPC, as a caller in any language would write it.
REQUESTS: dict[str, dict[str, dict[str, Any]]] = {
    "gateway": {"Recommend": {"query": "gift for a runner", "k": 3}},
    "ranking": {
        "Rank": {
            "context": {"query": "headphones"},
            "candidates": [
                {"itemId": "a", "text": "wireless headphones"},
                {"itemId": "b", "text": "socks"},
            ],
        },
        "RecallCandidates": {"userId": "U0194", "topK": 3},
    },
    "retrieval": {
        "Search": {"queryText": "headphones", "topK": 3},
        "GetItems": {"itemIds": ["unknown-id"]},
        "UpsertItems": {"items": [{"itemId": "GEN-1", "title": "Generic Client Test Lamp"}]},
        "DeleteItems": {"itemIds": ["GEN-1"]},
        "GetIndexInfo": {},
    },
}


def pool_from_protos(tmp_path: Path) -> descriptor_pool.DescriptorPool:
    """Compiles the .proto files to a descriptor set, as a non-Python caller's tooling would."""
    from grpc_tools import protoc

    out = tmp_path / "recsys.desc"
    files = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    assert (
        protoc.main(
            [
                "protoc",
                f"--proto_path={PROTO_ROOT}",
                f"--descriptor_set_out={out}",
                "--include_imports",
                *files,
            ]
        )
        == 0
    )
    file_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    pool = descriptor_pool.DescriptorPool()
    for proto in file_set.file:
        pool.Add(proto)
    return pool


def call_every_rpc(stack: Launcher, name: str, pool: descriptor_pool.DescriptorPool) -> None:
    service = pool.FindServiceByName(FULL_NAMES[name])
    assert set(service.methods_by_name) == set(REQUESTS[name])
    with grpc.insecure_channel(stack.address(name)) as channel:
        for method_name, body in REQUESTS[name].items():
            method = service.methods_by_name[method_name]
            request_cls = message_factory.GetMessageClass(method.input_type)
            response_cls = message_factory.GetMessageClass(method.output_type)
            call = channel.unary_unary(
                f"/{service.full_name}/{method_name}",
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=response_cls.FromString,
            )
            reply = call(json_format.ParseDict(body, request_cls()), timeout=30)
            assert isinstance(json_format.MessageToDict(reply), dict)


@pytest.mark.parametrize("name", ["retrieval", "ranking", "gateway"])
def test_reflection_only_client_calls_every_rpc(stack: Launcher, name: str) -> None:
    with grpc.insecure_channel(stack.address(name)) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        pool.FindServiceByName(FULL_NAMES[name])  # resolves while the channel is open
        call_every_rpc(stack, name, pool)


@pytest.mark.parametrize("name", ["retrieval", "ranking", "gateway"])
def test_proto_only_client_calls_every_rpc(stack: Launcher, name: str, tmp_path: Path) -> None:
    call_every_rpc(stack, name, pool_from_protos(tmp_path))


def test_grpc_status_for_unknown_method_is_unimplemented(stack: Launcher) -> None:
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        call = channel.unary_unary("/recsys.v1.GatewayService/Nope")
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
