"""recsys.rpc.server against real service processes over loopback: what every server promises.

Request bodies that do not parse are the caller's mistake (INVALID_ARGUMENT), RPCs beyond
max_concurrent_rpcs are refused with RESOURCE_EXHAUSTED, health says NOT_SERVING while
the service loads and while it drains after SIGTERM, and a drain answers every RPC it had
accepted before it exits.
"""

from __future__ import annotations

import signal
import socket
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pandas as pd
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from prometheus_client.parser import text_string_to_metric_families

from recsys.app.sample import sample_paths
from recsys.core.domain import item_text
from recsys.rpc.launcher import FULL_NAMES, Launcher
from recsys.v1 import (
    gateway_pb2,
    gateway_pb2_grpc,
    ranking_pb2,
    ranking_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SEARCH = f"/{FULL_NAMES['retrieval']}/Search"
# Long enough for a busy machine to see NOT_SERVING and still be answered meanwhile.
DRAIN_DELAY_S = 5.0


def server_metric(launcher: Launcher, name: str, sample_name: str, labels: dict[str, str]) -> float:
    """One grpc_server_* sample of the service's own method, from its /metrics."""
    url = f"http://127.0.0.1:{launcher.metrics_port(name)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = {"grpc_type": "unary", "grpc_service": FULL_NAMES[name], **labels}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and sample.labels == wanted:
                return float(sample.value)
    return 0.0


def handled(launcher: Launcher, name: str, method: str, code: str) -> float:
    """grpc_server_handled_total of one method and code."""
    labels = {"grpc_method": method, "grpc_code": code}
    return server_metric(launcher, name, "grpc_server_handled_total", labels)


def health_or_code(launcher: Launcher, name: str) -> int | grpc.StatusCode:
    """The health status, or the status code of the failed health check."""
    try:
        return launcher.health(name)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]


def test_garbage_request_bodies_are_invalid_argument(
    own_stack: Callable[..., Launcher],
) -> None:
    garbage = b"\xff\xff\xff\xff"
    with pytest.raises(DecodeError):  # really not a SearchRequest (no unknown-field luck)
        retrieval_pb2.SearchRequest.FromString(garbage)
    stack = own_stack("retrieval")
    before = handled(stack, "retrieval", "Search", "INVALID_ARGUMENT")
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        raw = channel.unary_unary(SEARCH, request_serializer=None, response_deserializer=None)
        # The raw path itself works: a well-formed body is answered.
        good = retrieval_pb2.SearchRequest(query_text="wireless headphones", top_k=3)
        reply = retrieval_pb2.SearchResponse.FromString(raw(good.SerializeToString(), timeout=30))
        assert len(reply.hits) == 3
        with pytest.raises(grpc.RpcError) as info:
            raw(garbage, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert "request body" in info.value.details() and SEARCH in info.value.details()
    # The server's metrics record the code it sent.
    assert handled(stack, "retrieval", "Search", "INVALID_ARGUMENT") == (before + 1)
    assert handled(stack, "retrieval", "Search", "UNKNOWN") == 0


def rank_request() -> ranking_pb2.RankRequest:
    """Every sample item as a candidate: seconds of cross-encoder work on a CPU."""
    catalog = pd.read_csv(sample_paths()[0], dtype=str).fillna("")
    return ranking_pb2.RankRequest(
        context=ranking_pb2.RankContext(query="wireless noise-cancelling headphones"),
        candidates=[
            ranking_pb2.Candidate(
                item_id=row.item_id, text=item_text(row.title, row.category, row.description)
            )
            for row in catalog.itertuples(index=False)
        ],
    )


def test_rpcs_beyond_max_concurrent_rpcs_are_resource_exhausted(
    own_stack: Callable[..., Launcher],
) -> None:
    stack = own_stack("ranking", max_concurrent_rpcs=1)
    request = rank_request()
    with grpc.insecure_channel(stack.address("ranking")) as channel:
        stub = ranking_pb2_grpc.RankingServiceStub(channel)
        # All at once: whichever arrives first holds the one slot for its whole Rank.
        calls = [stub.Rank.future(request, timeout=180) for _ in range(8)]
        ok, exhausted = 0, []
        for call in calls:
            try:
                assert len(call.result().candidates) == len(request.candidates)
                ok += 1
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                exhausted.append(exc.details())
        assert ok >= 1 and exhausted, (ok, exhausted)
        assert all("retry" in details for details in exhausted)
        # Refusals do not keep the slot: the next call is served.
        assert len(stub.Rank(request, timeout=180).candidates) == len(request.candidates)
    assert stack.health("ranking") == SERVING
    assert handled(stack, "ranking", "Rank", "RESOURCE_EXHAUSTED") == len(exhausted)
    assert handled(stack, "ranking", "Rank", "OK") == ok + 1


def test_health_is_not_serving_while_loading_and_while_draining(
    own_stack: Callable[..., Launcher],
) -> None:
    stack = own_stack("retrieval", wait=False, drain_delay_s=DRAIN_DELAY_S)
    # Loading: from the moment the server listens until its bundle is loaded.
    seen: list[int | grpc.StatusCode] = []
    give_up = time.monotonic() + 240
    while not seen or seen[-1] != SERVING:
        assert stack.exited() == {}, stack.log_tail("retrieval")
        assert time.monotonic() < give_up, f"not SERVING after 240 s: {seen[-5:]}"
        status = health_or_code(stack, "retrieval")
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.02)
    assert NOT_SERVING in seen[:-1], f"health said {seen} while retrieval started"
    assert grpc.StatusCode.UNKNOWN not in seen

    # Draining: NOT_SERVING at once after SIGTERM, while RPCs are still answered.
    stack.send("retrieval", signal.SIGTERM)
    draining: list[int | grpc.StatusCode] = []
    give_up = time.monotonic() + 60
    while not draining or draining[-1] == SERVING:
        assert time.monotonic() < give_up, f"health said {draining} after SIGTERM"
        draining.append(health_or_code(stack, "retrieval"))
        time.sleep(0.02)
    assert draining[-1] == NOT_SERVING, f"health said {draining} after SIGTERM"
    assert stack.health("retrieval", FULL_NAMES["retrieval"]) == NOT_SERVING
    with grpc.insecure_channel(stack.address("retrieval")) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        reply = stub.Search(
            retrieval_pb2.SearchRequest(query_text="headphones", top_k=2), timeout=30
        )
    assert len(reply.hits) == 2
    assert stack.stop("retrieval") == 0


def test_sigterm_under_load_drops_no_accepted_request(
    own_stack: Callable[..., Launcher],
) -> None:
    """Every Recommend the gateway accepted before SIGTERM is answered, then it exits 0."""
    stack = own_stack(grace_period_s=120)
    calls = 8
    request = gateway_pb2.RecommendRequest(query="wireless headphones", k=5, candidate_pool=100)
    with (
        grpc.insecure_channel(stack.address("gateway")) as channel,
        ThreadPoolExecutor(calls) as pool,
    ):
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        futures = [pool.submit(stub.Recommend, request, timeout=120) for _ in range(calls)]
        give_up = time.monotonic() + 60
        labels = {"grpc_method": "Recommend"}
        # Accepted = counted as started by the gateway's server.
        while server_metric(stack, "gateway", "grpc_server_started_total", labels) < calls:
            assert time.monotonic() < give_up, "the gateway never had every call in flight"
            time.sleep(0.01)
        stack.send("gateway", signal.SIGTERM)
        answers = [f.result() for f in futures]  # raises if any call failed
    assert all(len(a.items) == 5 for a in answers)
    assert stack.procs["gateway"].wait(timeout=120) == 0  # drained and exited by itself


@pytest.mark.parametrize(
    "port_field", ["gateway_port", "gateway_metrics_port", "gateway_health_port"]
)
def test_a_port_in_use_exits_2_with_one_line(
    own_stack: Callable[..., Launcher], port_field: str
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        stack = own_stack("gateway", wait=False, **{port_field: busy.getsockname()[1]})
        proc = stack.procs["gateway"]
        assert proc.wait(timeout=120) == 2
    log = stack.log_tail("gateway")
    assert log.splitlines()[-1].startswith("recsys: error: gateway: cannot "), log
    assert "Traceback" not in log
