"""test_serving's end-to-end tests again, with retrieval keeping the catalog in Milvus
(`retrieval_backend=milvus` on a Milvus Lite file) instead of its embedded FAISS index: the
same calls over real sockets, the same answers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from recsys.rpc.launcher import Launcher
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from tests.conftest import stack_settings
from tests.integration import test_serving as serving

pytest.importorskip("milvus_lite", reason="Milvus Lite comes with the milvus-lite extra")

# Collected here as well, with this module's `stack` and `own_stack`.
test_recommend_returns_ranked_items_with_breakdowns = (
    serving.test_recommend_returns_ranked_items_with_breakdowns
)
test_query_alone_marks_cf_missing = serving.test_query_alone_marks_cf_missing
test_history_without_a_query_ranks_cf_candidates_too = (
    serving.test_history_without_a_query_ranks_cf_candidates_too
)
test_health_and_reflection_on_every_server = serving.test_health_and_reflection_on_every_server
test_upsert_then_search_finds_it_first_also_after_restart = (
    serving.test_upsert_then_search_finds_it_first_also_after_restart
)
test_get_items_reports_unknown_ids = serving.test_get_items_reports_unknown_ids
test_bad_retrieval_requests_are_invalid_argument_and_change_nothing = (
    serving.test_bad_retrieval_requests_are_invalid_argument_and_change_nothing
)
catalog = serving.catalog
user_history = serving.user_history


def on_milvus(workdir: Path) -> dict[str, Any]:
    return {"retrieval_backend": "milvus", "milvus_uri": str(workdir / "milvus.db")}


@pytest.fixture(scope="module")
def stack(sample_bundle_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    workdir = tmp_path_factory.mktemp("milvus-stack")
    settings = stack_settings(sample_bundle_root, workdir).model_copy(update=on_milvus(workdir))
    launcher = Launcher(settings, log_dir=workdir, env={"OMP_NUM_THREADS": "1"})
    try:
        launcher.start_all(timeout=240)
        yield launcher
    finally:
        launcher.close()


@pytest.fixture
def own_stack(own_stack: Callable[..., Launcher], tmp_path: Path) -> Callable[..., Launcher]:
    def start(*names: str, wait: bool = True, **settings: Any) -> Launcher:
        return own_stack(*names, wait=wait, **(on_milvus(tmp_path) | settings))

    return start


def test_retrieval_reports_the_milvus_collection(stack: Launcher) -> None:
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        info = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30)
    assert info.device == "milvus"
    assert info.index_factory.startswith("milvus AUTOINDEX recsys_")
    assert info.size > 0
