"""End to end over real sockets: three servers, the sample bundle, real models.

Tests that only call share the module's `stack`; tests that stop, restart or change a service
get stacks of their own (`own_stack`), so a failure there cannot leave the others a service
down or a changed catalog.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from prometheus_client.parser import text_string_to_metric_families

from ranking_service.fusion import load_fusion, plan_for
from ranking_service.ranker import CROSS_ENCODER_SKIPPED
from recsys.app.sample import sample_paths
from recsys.core.bundle import FUSION, Bundle
from recsys.core.settings import default
from recsys.rpc.launcher import FULL_NAMES, SERVICES, Launcher
from recsys.v1 import (
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def catalog() -> pd.DataFrame:
    return pd.read_csv(sample_paths()[0], dtype=str).fillna("")


@pytest.fixture(scope="module")
def user_history() -> tuple[str, list[str]]:
    """A user from the sample log and their five most recent items (most recent first)."""
    log = pd.read_csv(sample_paths()[1], dtype={"user_id": str, "item_id": str})
    user = log["user_id"].value_counts().index[0]
    mine = log[log["user_id"] == user].sort_values("timestamp", ascending=False)
    return str(user), [str(i) for i in mine["item_id"].head(5)]


def recommend(stack: Launcher, **fields: object) -> gateway_pb2.RecommendResponse:
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        return stub.Recommend(gateway_pb2.RecommendRequest(**fields), timeout=30)


def search(stack: Launcher, text: str, k: int = 5) -> list[str]:
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        reply = stub.Search(retrieval_pb2.SearchRequest(query_text=text, top_k=k), timeout=30)
    return [hit.item_id for hit in reply.hits]


def gateway_recovers(stack: Launcher, within_s: float = 10.0) -> None:
    """Waits until the gateway answers undegraded again after a stage restarted.

    Its channels retry a restarted stage within their reconnect backoff (at most 2 s,
    recsys.rpc.channels.RECONNECT_BACKOFF_MS); until then calls fail fast or degrade, by design.
    """
    deadline = time.monotonic() + within_s
    while True:
        try:
            if not recommend(stack, query="recovery probe", k=3).degraded:
                return
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        assert time.monotonic() < deadline, "the gateway did not recover from a stage restart"
        time.sleep(0.2)


def test_recommend_returns_ranked_items_with_breakdowns(
    stack: Launcher,
    catalog: pd.DataFrame,
    user_history: tuple[str, list[str]],
    sample_bundle_root: Path,
) -> None:
    user, history = user_history
    searches = plan_for(load_fusion(Bundle.open(sample_bundle_root).file(FUSION)), has_query=True)
    reply = recommend(
        stack, user_id=user, query=catalog.iloc[0]["title"], history_item_ids=history, k=5
    )
    assert not reply.degraded, reply.degraded_reasons
    assert len(reply.items) == 5
    fused = [item.scores.fused for item in reply.items]
    assert fused == sorted(fused, reverse=True)
    for item in reply.items:
        assert item.title and item.item_id not in history
        assert item.scores.HasField("retrieval")
        # The cross-encoder scored the head where the build found it pays for searches.
        assert item.scores.HasField("cross_encoder") == searches.cross_encoder_pays
    assert (reply.versions.cross_encoder == CROSS_ENCODER_SKIPPED) != searches.cross_encoder_pays
    # A known user: CF scores the items it knows.
    assert any(item.scores.HasField("cf") for item in reply.items)
    assert reply.versions.bundle_version
    stages = {t.stage for t in reply.timings}
    assert {
        gateway_pb2.STAGE_RETRIEVAL,
        gateway_pb2.STAGE_RANKING,
        gateway_pb2.STAGE_TOTAL,
    } <= stages


def test_query_alone_marks_cf_missing(stack: Launcher, catalog: pd.DataFrame) -> None:
    reply = recommend(stack, query=catalog.iloc[3]["title"], k=5)
    assert not reply.degraded
    assert catalog.iloc[3]["item_id"] in [item.item_id for item in reply.items]
    assert all(not item.scores.HasField("cf") for item in reply.items)


def test_history_without_a_query_ranks_cf_candidates_too(
    stack: Launcher, user_history: tuple[str, list[str]]
) -> None:
    _, history = user_history
    reply = recommend(stack, history_item_ids=history, k=20, candidate_pool=20)
    assert not reply.degraded, reply.degraded_reasons
    assert not {item.item_id for item in reply.items} & set(history)
    from_cf = [item for item in reply.items if not item.scores.HasField("retrieval")]
    # CF folded the user in from history and proposed items of its own, which were ranked.
    assert from_cf and all(item.scores.HasField("cf") for item in from_cf)
    # The cross-encoder reranked the first pass's head, or the answer says it was skipped.
    reranked = [item for item in reply.items if item.scores.HasField("cross_encoder")]
    assert (reply.versions.cross_encoder == CROSS_ENCODER_SKIPPED) == (not reranked)


def test_user_id_alone_is_answered_from_cf(
    stack: Launcher, user_history: tuple[str, list[str]]
) -> None:
    user, _ = user_history
    reply = recommend(stack, user_id=user, k=5)
    assert not reply.degraded and len(reply.items) == 5
    assert all(
        item.scores.HasField("cf") and not item.scores.HasField("retrieval") for item in reply.items
    )
    with pytest.raises(grpc.RpcError) as info:
        recommend(stack, user_id="nobody-knows-me", k=5)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "nobody-knows-me" in info.value.details()


def test_health_and_reflection_on_every_server(stack: Launcher) -> None:
    for name in SERVICES:
        assert stack.health(name) == SERVING
        assert stack.health(name, FULL_NAMES[name]) == SERVING
        with grpc.insecure_channel(stack.address(name)) as channel:
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {FULL_NAMES[name], "grpc.health.v1.Health"} <= services


def test_upsert_then_search_finds_it_first_also_after_restart(
    own_stack: Callable[..., Launcher],
) -> None:
    stack = own_stack("retrieval")  # only retrieval takes part
    item = common_pb2.Item(
        item_id="NEW-1",
        title="Zephyrine Quantum Burr Espresso Grinder",
        description="A conical burr grinder for espresso.",
        category="kitchen",
    )
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        before = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=10).size
        reply = stub.UpsertItems(retrieval_pb2.UpsertItemsRequest(items=[item]), timeout=30)
    acknowledged = time.monotonic()
    # A word only this product holds finds it through the lexical index, at once (a backend
    # without one, Milvus here, finds it by its text only).
    assert lexical(stack, "zephyrine") == (["NEW-1"] if has_lexical(stack) else [])
    assert time.monotonic() - acknowledged < 1.0
    assert search(stack, item.title)[0] == "NEW-1"
    assert reply.upserted == 1 and reply.index_size == before + 1

    stack.stop("retrieval")
    stack.start("retrieval")
    assert search(stack, item.title)[0] == "NEW-1"
    assert lexical(stack, "zephyrine") == (["NEW-1"] if has_lexical(stack) else [])

    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        deleted = stub.DeleteItems(retrieval_pb2.DeleteItemsRequest(item_ids=["NEW-1"]), timeout=10)
    assert deleted.deleted == 1 and deleted.index_size == before
    assert "NEW-1" not in search(stack, item.title, k=20)
    assert lexical(stack, "zephyrine") == []
    stack.stop("retrieval")
    stack.start("retrieval")
    assert "NEW-1" not in search(stack, item.title, k=20)
    assert lexical(stack, "zephyrine") == []


def test_a_product_upserted_after_the_build_is_recommended_from_its_text(
    own_stack: Callable[..., Launcher], user_history: tuple[str, list[str]]
) -> None:
    """No interaction, no rebuild: retrieval's new-items search finds it nearest the latest
    item, ranking scores it by what its text says, and the answer keeps it a slot."""
    stack = own_stack()
    _, history = user_history  # headphones and a headphone case, most recent first
    new = common_pb2.Item(
        item_id="NEW-CASE",
        title="Bassline Large Hard-Shell Travel Headphone Case",
        description="A larger hard-shell travel case from Bassline for over-ear headphones, "
        "with a pocket for cables.",
        category="Electronics > Audio",
    )
    before = recommend(stack, history_item_ids=history, k=10)
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        stub.UpsertItems(retrieval_pb2.UpsertItemsRequest(items=[new]), timeout=30)
        # The products no interaction of the build had: the new one nearest the history.
        newest = stub.Search(
            retrieval_pb2.SearchRequest(history_item_ids=history[:1], top_k=1, new_items_only=True),
            timeout=30,
        )
    assert [(h.item_id, list(h.found_by)) for h in newest.hits] == [("NEW-CASE", ["new"])]
    # Near enough to the latest item (their cosine) to keep the slot.
    assert newest.hits[0].score >= default("new_item_min_similarity")
    after = recommend(stack, history_item_ids=history, k=10)
    assert not after.degraded, after.degraded_reasons
    assert "NEW-CASE" not in [item.item_id for item in before.items]
    ids = [item.item_id for item in after.items]
    # At the latest in the slot kept for a new product.
    assert "NEW-CASE" in ids[: default("new_item_slot")], [item.title for item in after.items]
    found = {item.item_id: item for item in after.items}
    scores = found["NEW-CASE"].scores
    # Only its text scored it: CF never saw it; the dense retriever read it.
    assert not scores.HasField("cf") and scores.HasField("retrieval")
    assert found["NEW-CASE"].title == new.title
    # The answer says which product the slot is for, and only that one.
    assert [item.item_id for item in after.items if item.new_product] == ["NEW-CASE"]


def has_lexical(stack: Launcher) -> bool:
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        info = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30)
    return info.lexical.startswith("bm25")


def lexical(stack: Launcher, text: str) -> list[str]:
    """The hits of a search that the lexical retriever found, each with its BM25 score."""
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        reply = stub.Search(retrieval_pb2.SearchRequest(query_text=text, top_k=5), timeout=30)
    found = [h for h in reply.hits if "lexical" in h.found_by]
    assert all(h.HasField("lexical_score") and h.lexical_score > 0 for h in found)
    return [h.item_id for h in found]


def test_get_items_reports_unknown_ids(stack: Launcher, catalog: pd.DataFrame) -> None:
    known = catalog.iloc[0]["item_id"]
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        reply = stub.GetItems(
            retrieval_pb2.GetItemsRequest(item_ids=[known, "nope-404"]), timeout=10
        )
    assert [r.item.item_id for r in reply.items] == [known]
    assert list(reply.missing_item_ids) == ["nope-404"]


def test_ranking_down_gives_degraded_answers_then_recovers(
    own_stack: Callable[..., Launcher], catalog: pd.DataFrame
) -> None:
    # The cross-encoder on every kind, whatever the build decided: recovery must bring it back.
    stack = own_stack(rerank_kinds="all")
    query = catalog.iloc[5]["title"]
    stack.stop("ranking")
    try:
        reply = recommend(stack, query=query, k=5)
        assert reply.degraded
        assert list(reply.degraded_reasons) == ["ranking_unavailable"]
        assert len(reply.items) == 5
        # In retrieval's order (the merge of its dense and lexical lists), with both scores.
        order = [item.scores.fused for item in reply.items]
        assert order == sorted(order, reverse=True)
        assert all(item.scores.HasField("retrieval") for item in reply.items)
        assert any(item.scores.HasField("lexical") for item in reply.items)
        assert all(not item.scores.HasField("cross_encoder") for item in reply.items)
    finally:
        stack.start("ranking")
    gateway_recovers(stack)
    reply = recommend(stack, query=query, k=5)
    assert not reply.degraded
    assert all(item.scores.HasField("cross_encoder") for item in reply.items)


def test_retrieval_down_fails_fast_with_unavailable(own_stack: Callable[..., Launcher]) -> None:
    stack = own_stack()
    stack.stop("retrieval")
    try:
        with pytest.raises(grpc.RpcError) as info:
            recommend(stack, query="anything", k=3)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "retrieval" in info.value.details()
    finally:
        stack.start("retrieval")
        gateway_recovers(stack)


BAD_RECOMMENDS = [
    ({}, "query"),
    ({"query": "x", "k": 1001}, "k"),
    ({"query": "x", "k": 10, "candidate_pool": 5}, "candidate_pool"),
    ({"query": "x", "k": 10, "candidate_pool": 100000}, "candidate_pool"),
    ({"query": "x", "diversity": 1.5}, "diversity"),
    ({"query": "x", "diversity": -0.1}, "diversity"),
    ({"query": "x" * 5000}, "query"),
]


@pytest.mark.parametrize(("fields", "field_name"), BAD_RECOMMENDS)
def test_bad_recommend_requests_are_invalid_argument(
    stack: Launcher, fields: dict[str, object], field_name: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        recommend(stack, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in info.value.details()


def test_bad_retrieval_requests_are_invalid_argument_and_change_nothing(stack: Launcher) -> None:
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        size = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=10).size
        cases = [
            (
                stub.Search,
                retrieval_pb2.SearchRequest(query_vector=[0.1, 0.2], top_k=3),
                "query_vector",
            ),
            (stub.Search, retrieval_pb2.SearchRequest(query_text="x", top_k=5000), "top_k"),
            (
                stub.UpsertItems,
                retrieval_pb2.UpsertItemsRequest(items=[common_pb2.Item(title="t")]),
                "item_id",
            ),
            (
                stub.UpsertItems,
                retrieval_pb2.UpsertItemsRequest(items=[common_pb2.Item(item_id="a")]),
                "title",
            ),
            (stub.DeleteItems, retrieval_pb2.DeleteItemsRequest(), "item_ids"),
        ]
        for method, request, field_name in cases:
            with pytest.raises(grpc.RpcError) as info:
                method(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
            assert field_name in info.value.details()
        assert stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=10).size == size


def scrape(stack: Launcher, name: str) -> str:
    url = f"http://127.0.0.1:{stack.metrics_port(name)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def value(text: str, name: str, **labels: str) -> float:
    """One sample's value (0 when absent) from /metrics text, matched on all its labels."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def handled(text: str, side: str, service: str, method: str, code: str) -> float:
    """grpc_{server,client}_handled_total of one unary method and status code."""
    return value(
        text,
        f"grpc_{side}_handled_total",
        grpc_type="unary",
        grpc_service=FULL_NAMES[service],
        grpc_method=method,
        grpc_code=code,
    )


def test_metrics_show_each_called_method_with_its_codes(
    stack: Launcher, sample_bundle_root: Path
) -> None:
    """Counters grow by exactly the calls made (every series may already exist at zero)."""
    ok_calls, bad_calls = 3, 2
    before = {name: scrape(stack, name) for name in SERVICES}
    for i in range(ok_calls):
        # A query alone: one Search and one Rank behind each Recommend.
        assert not recommend(stack, query=f"metrics probe {i}", k=2).degraded
    for _ in range(bad_calls):
        with pytest.raises(grpc.RpcError) as info:
            recommend(stack, query="x", k=5000)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = {name: scrape(stack, name) for name in SERVICES}

    def grew(name: str, metric: Callable[[str], float]) -> float:
        return metric(after[name]) - metric(before[name])

    def calls(name: str, side: str, service: str, method: str, code: str) -> float:
        return grew(name, lambda text: handled(text, side, service, method, code))

    assert calls("gateway", "server", "gateway", "Recommend", "OK") == ok_calls
    assert calls("gateway", "server", "gateway", "Recommend", "INVALID_ARGUMENT") == bad_calls
    # Refused requests never reach the pipeline or the stages.
    assert calls("gateway", "client", "retrieval", "Search", "OK") == ok_calls
    assert calls("gateway", "client", "ranking", "Rank", "OK") == ok_calls
    stage_total = "recsys_stage_duration_seconds_count"
    assert grew("gateway", lambda text: value(text, stage_total, stage="total")) == ok_calls
    assert calls("retrieval", "server", "retrieval", "Search", "OK") == ok_calls
    assert calls("ranking", "server", "ranking", "Rank", "OK") == ok_calls
    # The cross-encoder scored the first pass's top rerank_depth of each search once (when the
    # bundle found it pays for searches), in at least one batch a call.
    ranked = grew("gateway", lambda text: value(text, "recsys_candidates_sum", stage="ranked"))
    assert ranked > 0
    searches = plan_for(load_fusion(Bundle.open(sample_bundle_root).file(FUSION)), has_query=True)
    per_call = min(searches.rerank_depth, ranked / ok_calls) if searches.cross_encoder_pays else 0
    scored = grew("ranking", lambda text: value(text, "recsys_ranking_batch_size_sum"))
    assert scored == ok_calls * per_call
    batches = grew("ranking", lambda text: value(text, "recsys_ranking_batch_size_count"))
    assert batches >= (ok_calls if per_call else 0)


@pytest.mark.parametrize("rerank_kinds", ["validated", "all"])
def test_the_demo_says_whether_the_cross_encoder_ran_and_what_it_moved(
    request: pytest.FixtureRequest, sample_bundle_root: Path, rerank_kinds: str
) -> None:
    from recsys.app.demo import cross_encoder_line, cross_encoder_verdicts, demo_calls

    # The bundle's plan is the module's stack; forcing it on needs a stack of its own.
    stack: Launcher = (
        request.getfixturevalue("stack")
        if rerank_kinds == "validated"
        else request.getfixturevalue("own_stack")(rerank_kinds=rerank_kinds)
    )
    verdicts = cross_encoder_verdicts(Bundle.open(sample_bundle_root).manifest)
    # The build's own figures, per kind.
    assert all(v.startswith("on this shop it ") and "NDCG@10" in v for v in verdicts.values())
    ran = 0
    for call in demo_calls():
        reply = recommend(stack, **{f.name: v for f, v in call.request.ListFields()})
        line = cross_encoder_line(call, reply, verdicts)
        ranks = [item.scores.first_pass_rank for item in reply.items]
        assert all(item.scores.HasField("first_pass_rank") for item in reply.items)
        if reply.versions.cross_encoder == CROSS_ENCODER_SKIPPED:
            assert line.startswith(
                "   cross-encoder: skipped (" + verdicts[bool(call.request.query)]
            )
            if not call.request.diversity:  # only the new-product slot reorders the first pass
                kept = [
                    r for r, item in zip(ranks, reply.items, strict=True) if not item.new_product
                ]
                assert kept == list(range(1, len(kept) + 1))
        else:
            ran += 1
            assert line.startswith("   cross-encoder: ran (")
            moved = [
                f"{item.item_id} {first}→{position}"
                for position, (item, first) in enumerate(
                    zip(reply.items, ranks, strict=True), start=1
                )
                if first != position and not item.new_product
            ]
            assert line.endswith(", ".join(moved) if moved else "the first pass's order kept")
    if rerank_kinds == "all":  # forced on, it runs for every demo call (each has text to read)
        assert ran == len(demo_calls())
