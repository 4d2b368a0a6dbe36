"""Retrieval replicas sharing one change log on a real PostgreSQL, as separate processes over
real gRPC: a write sent to any replica reaches all of them, and a replica started later has
caught up by the time its health says SERVING."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import grpc

from recsys.rpc.launcher import Launcher, free_port
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.changelog import ChangeLog
from tests.postgres import PostgresServer

Stub = retrieval_pb2_grpc.RetrievalServiceStub
# Generous for a busy 2-core machine; the figures printed are what matters (usually ~10 ms).
VISIBLE_WITHIN_S = 10.0


def stub(launcher: Launcher) -> tuple[grpc.Channel, Stub]:
    channel = grpc.insecure_channel(launcher.address("retrieval"))
    return channel, Stub(channel)


def upsert(target: Stub, item_id: str, title: str) -> None:
    request = retrieval_pb2.UpsertItemsRequest(
        items=[common_pb2.Item(item_id=item_id, title=title, category="Replicated")]
    )
    target.UpsertItems(request, timeout=30)


def holds(target: Stub, item_id: str) -> bool:
    reply = target.GetItems(retrieval_pb2.GetItemsRequest(item_ids=[item_id]), timeout=30)
    return not reply.missing_item_ids


def info(target: Stub) -> retrieval_pb2.GetIndexInfoResponse:
    return target.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30)


def seconds_until_everywhere(stubs: list[Stub], item_id: str, since: float) -> float:
    pending = list(stubs)
    while pending:
        pending = [s for s in pending if not holds(s, item_id)]
        assert time.monotonic() - since < VISIBLE_WITHIN_S, f"{item_id} not on every replica"
        if pending:
            time.sleep(0.005)
    return time.monotonic() - since


def test_a_write_to_any_replica_reaches_all_and_a_late_replica_catches_up_first(
    own_stack: Callable[..., Launcher], change_log_url: str
) -> None:
    replicas = [own_stack("retrieval", wait=False, change_log_url=change_log_url) for _ in range(3)]
    for replica in replicas:
        replica.wait_serving("retrieval", timeout=240)
    channels, stubs = zip(*(stub(r) for r in replicas), strict=True)
    size = info(stubs[0]).size

    latencies = []
    for n in range(12):
        item_id = f"replicated-{n}"
        started = time.monotonic()
        upsert(stubs[n % 3], item_id, f"Hand-thrown ceramic teapot number {n}")
        assert holds(stubs[n % 3], item_id)  # read-your-write on the replica that took it
        latencies.append(seconds_until_everywhere(list(stubs), item_id, started))
    deleted = stubs[1].DeleteItems(
        retrieval_pb2.DeleteItemsRequest(item_ids=["replicated-0", "never-there"]), timeout=30
    )
    assert (deleted.deleted, list(deleted.missing_item_ids)) == (1, ["never-there"])
    # A search on any replica finds an item written through another.
    hits = stubs[2].Search(
        retrieval_pb2.SearchRequest(query_text="ceramic teapot number 4", top_k=3), timeout=30
    )
    assert "replicated-4" in [h.item_id for h in hits.hits]

    head = ChangeLog(change_log_url).head()
    deadline = time.monotonic() + VISIBLE_WITHIN_S
    while {info(s).change_log_position for s in stubs} != {head}:
        assert time.monotonic() < deadline, "replicas did not converge on the log's head"
        time.sleep(0.02)
    assert {info(s).size for s in stubs} == {size + 11}
    assert {info(s).change_log for s in stubs} == {ChangeLog(change_log_url).name}

    # A fourth replica, started after the writes: once SERVING it holds all of them.
    late = own_stack("retrieval", wait=False, change_log_url=change_log_url)
    late.wait_serving("retrieval", timeout=240)
    late_channel, late_stub = stub(late)
    assert info(late_stub).change_log_position == head
    assert info(late_stub).size == size + 11
    assert not holds(late_stub, "replicated-0") and holds(late_stub, "replicated-11")
    for channel in (*channels, late_channel):
        channel.close()
    print(
        f"\nreplication: a write on one of 3 replicas was on all 3 after "
        f"median {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms "
        f"({len(latencies)} writes)"
    )


def test_a_replica_that_cannot_reach_the_log_exits_4_with_one_line(
    own_stack: Callable[..., Launcher], postgres: PostgresServer
) -> None:
    """It cannot catch up, so it must not serve: one line naming the log, no traceback, and the
    exit code of an unreachable dependency."""
    unreachable = postgres.url("catalog").replace(f":{postgres.port}/", f":{free_port()}/")
    stack = own_stack("retrieval", wait=False, change_log_url=unreachable)
    assert stack.procs["retrieval"].wait(timeout=120) == 4
    log = stack.log_tail("retrieval")
    assert log.splitlines()[-1].startswith("recsys: error: change log postgresql://"), log
    assert "Traceback" not in log
