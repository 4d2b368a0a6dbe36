"""Retrieval's journal against kill -9: an acknowledged change survives, whenever the kill lands.

Writer threads send one-item UpsertItems and DeleteItems without pause while retrieval is
killed -9 and restarted on the same state dir, again and again. Acknowledged = the RPC returned
OK. Each id belongs to one writer, which touches it in a known order and never again after a
failed call, so every id ends in a state the acknowledgements decide: the effect of its last
acknowledged change, or of the one failed change after it (which may or may not have landed).
"""

from __future__ import annotations

import random
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from recsys.rpc.launcher import Launcher
from recsys.v1 import common_pb2, retrieval_pb2, retrieval_pb2_grpc
from tests.chaos.conftest import Scale, kill9, quick_channel

CALL_TIMEOUT_S = 60.0  # only kills end calls early: a timed-out write could still land later
FAILED_CALL_PAUSE_S = 0.25  # while retrieval restarts, calls fail fast: do not spin

# An id's state: None when absent, else the title it holds.
State = str | None


@dataclass
class Change:
    """One write to one id, as its writer sent it."""

    state: State  # what the write makes of the id: a title (upsert) or None (delete)
    acked: bool = False
    deleted: int | None = None  # DeleteItemsResponse.deleted, for acknowledged deletes


@dataclass
class Ledger:
    """Every write sent, per id in send order; a writer stops using an id after a failure."""

    changes: dict[str, list[Change]] = field(default_factory=dict)
    acked: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, item_id: str, change: Change) -> None:
        with self.lock:
            self.changes.setdefault(item_id, []).append(change)
            if change.acked:
                self.acked += 1
            else:
                self.failed += 1

    def usable(self, item_id: str) -> bool:
        """Whether the id's every change so far was acknowledged (it may be written again)."""
        with self.lock:
            return all(c.acked for c in self.changes.get(item_id, []))

    def allowed(self, item_id: str) -> set[State]:
        """The states the id may be in: that of its last acknowledged change (absent before
        any), and that of the failed change after it, if any."""
        changes = self.changes[item_id]
        acked = [c for c in changes if c.acked]
        allowed = {acked[-1].state if acked else None}
        if not changes[-1].acked:
            allowed.add(changes[-1].state)
        return allowed


class Writer(threading.Thread):
    """Upserts new ids, later retitles some and deletes others: one-item calls, in order."""

    def __init__(self, number: int, address: str, ledger: Ledger, stop: threading.Event) -> None:
        super().__init__(name=f"writer-{number}", daemon=True)
        self.number = number
        self.address = address
        self.ledger = ledger
        self.stop = stop
        self.random = random.Random(number)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with quick_channel(self.address) as channel:
                stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
                for op in self.ops():
                    if self.stop.is_set():
                        return
                    if not op(stub):
                        time.sleep(FAILED_CALL_PAUSE_S)
        except BaseException as exc:  # reported by the test, not lost in a thread
            self.error = exc

    def ops(self) -> Iterator[Callable[[retrieval_pb2_grpc.RetrievalServiceStub], bool]]:
        """Per id n: upsert it; when n % 3 == 2, then delete n - 1 and upsert n anew (retitle)."""
        n = 0
        while True:
            yield self.upsert_op(self.item_id(n))
            if n % 3 == 2:
                yield self.delete_op(self.item_id(n - 1))
                yield self.upsert_op(self.item_id(n))
            n += 1

    def item_id(self, n: int) -> str:
        return f"chaos-w{self.number}-{n:05d}"

    def title(self, item_id: str) -> str:
        """A text no other write uses (its search must find this item first)."""
        words = ["".join(self.random.choices(string.ascii_lowercase, k=7)) for _ in range(3)]
        return f"{' '.join(words)} {item_id}"

    def upsert_op(self, item_id: str) -> Callable[[retrieval_pb2_grpc.RetrievalServiceStub], bool]:
        def op(stub: retrieval_pb2_grpc.RetrievalServiceStub) -> bool:
            if not self.ledger.usable(item_id):
                return True
            change = Change(self.title(item_id))
            request = retrieval_pb2.UpsertItemsRequest(
                items=[common_pb2.Item(item_id=item_id, title=change.state)]
            )
            try:
                stub.UpsertItems(request, timeout=CALL_TIMEOUT_S)
                change.acked = True
            except grpc.RpcError:
                pass
            self.ledger.record(item_id, change)
            return change.acked

        return op

    def delete_op(self, item_id: str) -> Callable[[retrieval_pb2_grpc.RetrievalServiceStub], bool]:
        def op(stub: retrieval_pb2_grpc.RetrievalServiceStub) -> bool:
            if not self.ledger.usable(item_id):
                return True
            change = Change(None)
            request = retrieval_pb2.DeleteItemsRequest(item_ids=[item_id])
            try:
                change.deleted = stub.DeleteItems(request, timeout=CALL_TIMEOUT_S).deleted
                change.acked = True
            except grpc.RpcError:
                pass
            self.ledger.record(item_id, change)
            return change.acked

        return op


def wait_for_acks(ledger: Ledger, count: int, writers: list[Writer], within_s: float) -> None:
    """Returns once `count` more changes are acknowledged; fails if writers die or stall."""
    target = ledger.acked + count
    give_up = time.monotonic() + within_s
    while ledger.acked < target:
        for writer in writers:
            assert writer.error is None, f"{writer.name} raised {writer.error!r}"
        assert time.monotonic() < give_up, f"{ledger.acked}/{target} acks after {within_s}s"
        time.sleep(0.05)


def stop_writers(writers: list[Writer], stop: threading.Event) -> None:
    """Stops the writers and fails if one raised or is stuck in a call."""
    stop.set()
    for writer in writers:
        writer.join(timeout=2 * CALL_TIMEOUT_S)
    for writer in writers:
        assert writer.error is None, f"{writer.name} raised {writer.error!r}"
        assert not writer.is_alive(), f"{writer.name} is stuck in a call"


def current_states(
    stub: retrieval_pb2_grpc.RetrievalServiceStub, ids: list[str]
) -> dict[str, State]:
    """Each id's title as retrieval's GetItems reads it back, None when missing."""
    states: dict[str, State] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        reply = stub.GetItems(retrieval_pb2.GetItemsRequest(item_ids=chunk), timeout=60)
        states |= dict.fromkeys(reply.missing_item_ids)
        states |= {record.item.item_id: record.item.title for record in reply.items}
    assert set(states) == set(ids), "GetItems answered for other ids than asked"
    return states


def first_hits(stub: retrieval_pb2_grpc.RetrievalServiceStub, text: str, k: int) -> list[str]:
    reply = stub.Search(retrieval_pb2.SearchRequest(query_text=text, top_k=k), timeout=60)
    return [hit.item_id for hit in reply.hits]


def lexical_hits(stub: retrieval_pb2_grpc.RetrievalServiceStub, word: str) -> list[str]:
    """The hits the lexical retriever found for a one-word search."""
    reply = stub.Search(retrieval_pb2.SearchRequest(query_text=word, top_k=5), timeout=60)
    return [hit.item_id for hit in reply.hits if "lexical" in hit.found_by]


# The default threshold never compacts in a CI-sized run; 5 compacts every few writes, so kills
# also land while a snapshot is written, renamed, or its journal segments removed.
@pytest.mark.parametrize("compact_records", [None, 5], ids=["journal", "compacting"])
def test_acknowledged_changes_survive_kill_9_under_writes(
    own_stack: Callable[..., Launcher], scale: Scale, compact_records: int | None
) -> None:
    kills = scale.pick(3, 12)
    writer_count = scale.pick(3, 6)
    acks_per_life = scale.pick(15, 80)  # acknowledged before each kill, so kills land mid-write
    tuned = {"journal_compact_records": compact_records} if compact_records else {}
    stack = own_stack("retrieval", **tuned)
    address = stack.address("retrieval")
    with quick_channel(address) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        catalog_size = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30).size

    ledger, stop = Ledger(), threading.Event()
    writers = [Writer(n, address, ledger, stop) for n in range(writer_count)]
    for writer in writers:
        writer.start()
    chance = random.Random(13)
    try:
        for _ in range(kills):
            wait_for_acks(ledger, acks_per_life, writers, within_s=120)
            time.sleep(chance.uniform(0, 0.3))  # not always right after an ack
            kill9(stack, "retrieval")
            stack.start("retrieval")  # same Settings: same port and state dir
        wait_for_acks(ledger, acks_per_life, writers, within_s=120)
    finally:
        stop_writers(writers, stop)
    # One more crash with the writers stopped: what is read back below was replayed.
    kill9(stack, "retrieval")
    stack.start("retrieval")

    ids = sorted(ledger.changes)
    with quick_channel(address) as channel:
        stub = retrieval_pb2_grpc.RetrievalServiceStub(channel)
        states = current_states(stub, ids)
        wrong = {i: states[i] for i in ids if states[i] not in ledger.allowed(i)}
        assert not wrong, f"{len(wrong)} ids not as acknowledged, e.g. {list(wrong.items())[:5]}"
        # Acknowledged deletes each removed an acknowledged upsert (deleted=0 would be a lost one).
        deletes = [
            c for changes in ledger.changes.values() for c in changes if c.deleted is not None
        ]
        assert deletes and all(c.deleted == 1 for c in deletes)
        # Search agrees with GetItems: a kept item is found by its own text, a deleted one never.
        kept = {i: title for i, title in states.items() if title is not None}
        for item_id, title in kept.items():
            assert first_hits(stub, title, 1) == [item_id], f"search lost {item_id}: {title!r}"
            # The lexical index was replayed too: a word only this title holds finds it.
            assert lexical_hits(stub, title.split()[0]) == [item_id], f"lexical lost {item_id}"
        for item_id in ids:
            if states[item_id] is None and ledger.changes[item_id][-1].acked:
                title = next(c.state for c in ledger.changes[item_id] if c.state)
                assert item_id not in first_hits(stub, title, 10), f"{item_id} is back"
                assert item_id not in lexical_hits(stub, title.split()[0]), f"{item_id} is back"
        # Nothing else appeared or vanished: the catalog plus exactly the ids that are present.
        size = stub.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=30).size
        assert size == catalog_size + len(kept)
    # The run really exercised both kinds of change and the failures the kills caused.
    required = [i for i in ids if len(ledger.allowed(i)) == 1]
    assert sum(states[i] is not None for i in required) >= acks_per_life
    assert sum(states[i] is None for i in required) >= kills
    assert ledger.failed >= kills
    if compact_records:
        assert stack.log_dir is not None
        log = (stack.log_dir / "retrieval.log").read_text(errors="replace")
        assert log.count("compacted online changes") >= kills, "the runs barely compacted"
    print(
        f"\ndurability: {kills + 1} kills -9, {writer_count} writers, {ledger.acked} changes "
        f"acknowledged ({len(deletes)} deletes), {ledger.failed} failed, {len(kept)} ids kept, "
        f"lost 0"
    )
