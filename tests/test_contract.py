"""The committed stubs are exactly what the .proto files generate, and follow buf's naming."""

from __future__ import annotations

from pathlib import Path

from recsys.app import codegen
from recsys.v1 import common_pb2, gateway_pb2, ranking_pb2, retrieval_pb2

COMMITTED = codegen.REPO_ROOT / "recsys" / "v1"


def test_committed_stubs_match_fresh_generation(tmp_path: Path) -> None:
    generated = codegen.generate(tmp_path)
    assert generated, "protoc produced nothing"
    fresh = {p.name: p.read_bytes() for p in generated}
    committed = {p.name: p.read_bytes() for p in COMMITTED.glob("*_pb2*.py*")}
    assert sorted(fresh) == sorted(committed), "stub file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `make protos` and commit"


def test_services_and_enums_follow_proto_style() -> None:
    services = {
        name
        for module in (retrieval_pb2, ranking_pb2, gateway_pb2)
        for name in module.DESCRIPTOR.services_by_name
    }
    assert services == {"RetrievalService", "RankingService", "GatewayService"}
    for module in (common_pb2, retrieval_pb2, ranking_pb2, gateway_pb2):
        assert module.DESCRIPTOR.package == "recsys.v1"
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            assert enum.values[0].name.endswith("_UNSPECIFIED"), enum.name
            assert enum.values[0].number == 0


def test_contract_has_every_rpc_the_design_names() -> None:
    retrieval = retrieval_pb2.DESCRIPTOR.services_by_name["RetrievalService"]
    assert set(retrieval.methods_by_name) == {
        "Search",
        "GetItems",
        "UpsertItems",
        "DeleteItems",
        "GetIndexInfo",
    }
    assert set(ranking_pb2.DESCRIPTOR.services_by_name["RankingService"].methods_by_name) == {
        "Rank",
        "RecallCandidates",
    }
    assert set(gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].methods_by_name) == {
        "Recommend"
    }
