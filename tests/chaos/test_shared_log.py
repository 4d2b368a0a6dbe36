"""Three retrieval replicas on one PostgreSQL change log, under a stream of writes sent to all of
them, while a replica and then the log's server are killed -9: no acknowledged change is lost,
and every replica ends with the same catalog.

The writers and the ledger are test_durability's: an id belongs to one writer (which sends all
its calls to one replica), so its final state is decided by the acknowledgements. PostgreSQL
runs with its durable defaults (fsync=on, synchronous_commit=on): a commit returns once its WAL
record is flushed, and retrieval acknowledges a write only after the commit.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from recsys.rpc.launcher import Launcher
from recsys.v1 import retrieval_pb2, retrieval_pb2_grpc
from retrieval_service.changelog import ChangeLog
from tests.chaos.conftest import Scale, kill9, quick_channel
from tests.chaos.test_durability import (
    Ledger,
    Writer,
    current_states,
    first_hits,
    stop_writers,
    wait_for_acks,
)
from tests.postgres import PostgresServer

REPLICAS = 3


def test_killing_a_replica_or_the_log_server_loses_no_acknowledged_change(
    own_stack: Callable[..., Launcher], own_postgres: PostgresServer, scale: Scale
) -> None:
    url = own_postgres.create_database("catalog")
    replicas = [own_stack("retrieval", wait=False, change_log_url=url) for _ in range(REPLICAS)]
    for replica in replicas:
        replica.wait_serving("retrieval", timeout=240)
    addresses = [r.address("retrieval") for r in replicas]
    with quick_channel(addresses[0]) as channel:
        catalog_size = (
            retrieval_pb2_grpc.RetrievalServiceStub(channel)
            .GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30)
            .size
        )

    writer_count = scale.pick(REPLICAS, 2 * REPLICAS)
    acks_per_phase = scale.pick(15, 80)
    rounds = scale.pick(1, 4)
    ledger, stop = Ledger(), threading.Event()
    writers = [Writer(n, addresses[n % REPLICAS], ledger, stop) for n in range(writer_count)]
    for writer in writers:
        writer.start()
    chance = random.Random(17)
    try:
        for _ in range(rounds):
            wait_for_acks(ledger, acks_per_phase, writers, within_s=120)
            victim = chance.choice(replicas)
            time.sleep(chance.uniform(0, 0.3))
            kill9(victim, "retrieval")
            victim.start("retrieval", wait=False)  # restarts while the others take writes
            wait_for_acks(ledger, acks_per_phase, writers, within_s=120)
            victim.wait_serving("retrieval", timeout=240)
            time.sleep(chance.uniform(0, 0.3))
            own_postgres.kill()
            time.sleep(0.5)  # writes fail meanwhile: none of them may be acknowledged
            own_postgres.start()
        wait_for_acks(ledger, acks_per_phase, writers, within_s=120)
    finally:
        stop_writers(writers, stop)

    head = ChangeLog(url).head()
    ids = sorted(ledger.changes)
    answers = []
    for address in addresses:
        with quick_channel(address) as channel:
            stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
            deadline = time.monotonic() + 60
            while (
                position := stub.GetIndexInfo(
                    retrieval_pb2.GetIndexInfoRequest(), timeout=30
                ).change_log_position
            ) != head:
                assert time.monotonic() < deadline, f"{address} stuck at {position} of {head}"
                time.sleep(0.1)
            states = current_states(stub, ids)
            wrong = {i: states[i] for i in ids if states[i] not in ledger.allowed(i)}
            assert not wrong, f"{address}: {len(wrong)} ids not as acknowledged: {wrong}"
            kept = {i: title for i, title in states.items() if title is not None}
            for item_id, title in list(kept.items())[:20]:
                assert first_hits(stub, title, 1) == [item_id], f"search lost {item_id}"
            size = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30).size
            assert size == catalog_size + len(kept)
            answers.append(states)
    assert all(states == answers[0] for states in answers), "replicas disagree"
    deletes = [c for changes in ledger.changes.values() for c in changes if c.deleted is not None]
    assert deletes and all(c.deleted == 1 for c in deletes)
    assert ledger.failed >= rounds  # the log's server was really down under writes
    print(
        f"\nshared log: {REPLICAS} replicas, {rounds} replica kill(s) -9 and {rounds} PostgreSQL "
        f"kill(s) -9, {writer_count} writers, {ledger.acked} changes acknowledged "
        f"({len(deletes)} deletes), {ledger.failed} failed, lost 0, replicas identical"
    )
