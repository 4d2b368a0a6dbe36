"""The gateway under steady Recommend load while a stage dies (kill -9) or stalls (SIGSTOP).

Every request must end by its deadline: answered (degraded, saying why, when a stage is
missing) or refused fast with UNAVAILABLE, and after the stage is back answers are full again.
Half the requests carry a caller's deadline; the other half none, so the gateway's own budget
(Settings.default_budget_ms) is what must end them: a client-side timer cannot hide a hang
there.
"""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import pandas as pd
import pytest

from recsys.app.sample import sample_paths
from recsys.core.domain import DegradedReason
from recsys.rpc.launcher import Launcher
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from tests.chaos.conftest import Scale, kill9, quick_channel

# Ten times the slowest healthy answer seen on a busy 2-core machine (0.4 s).
CALLER_DEADLINE_S = 4.0
BUDGET_S = 4.0  # the gateway's default budget: requests without a deadline get this long
PACE_S = 0.05  # each client thread starts at most one call per PACE_S
# How late an answer may come after its deadline: the gateway's event loop and the client's
# thread share 2 busy cores with the services (one of them maybe reloading its models).
LATE_SLACK_S = 2.0
# UNAVAILABLE is only "fast" well inside the deadline: a refusal at the deadline is a hang.
FAIL_FAST_S = CALLER_DEADLINE_S / 2
HANG_GUARD_S = 60.0  # a call without a deadline still ends the test's wait here
RECOVERY_S = 30.0  # after a stage is SERVING again (the gateway's reconnect backoff is ≤ 2 s)
REASONS = {str(r) for r in DegradedReason}
Kind = str  # "query", "history" or "user": which stages a Recommend needs


@dataclass(frozen=True)
class Outcome:
    """How one Recommend ended, as its caller saw it."""

    kind: Kind
    deadline_s: float | None  # the caller's; None: the gateway's default budget applies
    started: float  # time.monotonic()
    ended: float
    code: grpc.StatusCode | None  # None: no answer within HANG_GUARD_S
    reasons: tuple[str, ...] = ()
    items: int = 0
    degraded: bool = False

    @property
    def elapsed(self) -> float:
        return self.ended - self.started

    @property
    def full(self) -> bool:
        return self.code == grpc.StatusCode.OK and not self.degraded


def requests() -> list[tuple[Kind, gateway_pb2.RecommendRequest]]:
    """Recommends of three kinds over the sample: a query (retrieval, then ranking), a history
    (retrieval and CF recall, then ranking), a known user alone (CF recall only)."""
    catalog_csv, log_csv = sample_paths()
    titles = pd.read_csv(catalog_csv, dtype=str)["title"].tolist()
    log = pd.read_csv(log_csv, dtype={"user_id": str, "item_id": str})
    users = log["user_id"].value_counts().index[:8].tolist()
    made: list[tuple[Kind, gateway_pb2.RecommendRequest]] = []
    for n, user in enumerate(users):
        mine = log[log["user_id"] == user].sort_values("timestamp", ascending=False)
        history = mine["item_id"].head(5).tolist()
        made.append(("query", gateway_pb2.RecommendRequest(query=titles[n * 37], k=5)))
        made.append(("history", gateway_pb2.RecommendRequest(history_item_ids=history, k=5)))
        made.append(("user", gateway_pb2.RecommendRequest(user_id=user, k=5)))
    return made


class Load:
    """Client threads sending Recommend without pause; `outcomes` grows as calls end."""

    def __init__(self, address: str, threads: int) -> None:
        self.address = address
        self.requests = requests()
        self.outcomes: list[Outcome] = []
        self._numbers = itertools.count()  # next() is atomic under the GIL
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        self.errors: list[BaseException] = []

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, failure: type[BaseException] | None, *rest: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=HANG_GUARD_S + 10)
        if failure is None:  # else the test's own failure says more
            assert not any(t.is_alive() for t in self._threads), "a load thread is stuck"
            assert not self.errors, self.errors

    def _run(self) -> None:
        try:
            with quick_channel(self.address) as channel:
                stub = gateway_pb2_grpc.GatewayServiceStub(channel)
                while not self._stop.is_set():
                    n = next(self._numbers)  # shared: every thread sends every kind
                    kind, request = self.requests[n % len(self.requests)]
                    deadline = CALLER_DEADLINE_S if n % 2 else None
                    outcome = self._send(stub, kind, request, deadline)
                    self.outcomes.append(outcome)
                    # A steady stream, also while calls fail in a millisecond.
                    time.sleep(max(0.0, PACE_S - outcome.elapsed))
        except BaseException as exc:
            self.errors.append(exc)

    @staticmethod
    def _send(
        stub: gateway_pb2_grpc.GatewayServiceStub,
        kind: Kind,
        request: gateway_pb2.RecommendRequest,
        deadline: float | None,
    ) -> Outcome:
        started = time.monotonic()
        call = stub.Recommend.future(request, timeout=deadline)
        try:
            reply = call.result(timeout=HANG_GUARD_S)
        except grpc.FutureTimeoutError:
            call.cancel()
            return Outcome(kind, deadline, started, time.monotonic(), None)
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            return Outcome(kind, deadline, started, time.monotonic(), code)
        return Outcome(
            kind,
            deadline,
            started,
            time.monotonic(),
            grpc.StatusCode.OK,
            tuple(reply.degraded_reasons),
            len(reply.items),
            reply.degraded,
        )

    def since(self, moment: float) -> list[Outcome]:
        """Outcomes of the calls started at or after `moment` (time.monotonic())."""
        return [o for o in list(self.outcomes) if o.started >= moment]

    def wait(self, moment: float, enough: Callable[[list[Outcome]], bool], within_s: float) -> None:
        """Waits until the calls started since `moment` are `enough`."""
        give_up = time.monotonic() + within_s
        while not enough(self.since(moment)):
            assert not self.errors, self.errors
            assert time.monotonic() < give_up, f"not enough outcomes after {within_s}s"
            time.sleep(0.05)


def check_bounded(outcomes: Sequence[Outcome], codes: set[grpc.StatusCode]) -> None:
    """Every call ended in time with an allowed code, and every answer says why it is degraded."""
    for o in outcomes:
        assert o.code is not None, f"{o.kind} call without deadline hung for {HANG_GUARD_S}s"
        limit = (o.deadline_s or BUDGET_S) + LATE_SLACK_S
        assert o.elapsed <= limit, f"{o.kind} ended after {o.elapsed:.1f}s ({o.code.name})"
        assert o.code in codes, f"{o.kind}: {o.code.name} after {o.elapsed:.1f}s"
        if o.code == grpc.StatusCode.UNAVAILABLE:
            assert o.elapsed <= FAIL_FAST_S, f"{o.kind}: UNAVAILABLE after {o.elapsed:.1f}s"
        if o.code == grpc.StatusCode.OK:
            assert o.degraded == bool(o.reasons) and set(o.reasons) <= REASONS, o
            assert o.items > 0, o


def recovers(load: Load, moment: float, window: int) -> None:
    """From `moment` on, a full answer comes within RECOVERY_S, and every call started after
    it (the next `window` of them at least) is answered in full."""
    load.wait(moment, lambda got: any(o.full for o in got), RECOVERY_S)
    first_full = min(o.ended for o in load.since(moment) if o.full)
    load.wait(first_full, lambda got: len(got) >= window, within_s=RECOVERY_S + window)
    after = load.since(first_full)
    assert all(o.full for o in after), [o for o in after if not o.full][:3]


def summary(name: str, outcomes: Sequence[Outcome]) -> str:
    counts: dict[str, int] = {}
    for o in outcomes:
        key = "full" if o.full else ",".join(o.reasons) if o.code == grpc.StatusCode.OK else ""
        key = key or (o.code.name if o.code else "HANG")
        counts[key] = counts.get(key, 0) + 1
    slowest = max(o.elapsed for o in outcomes)
    return f"\n{name}: {len(outcomes)} requests, slowest {slowest:.2f}s, {counts}"


@pytest.fixture
def faulty_stack(own_stack: Callable[..., Launcher]) -> Launcher:
    return own_stack(default_budget_ms=BUDGET_S * 1000)


def test_ranking_killed_under_load_degrades_then_recovers(
    faulty_stack: Launcher, scale: Scale
) -> None:
    stack, threads = faulty_stack, scale.pick(3, 6)
    window = scale.pick(12, 60)
    with Load(stack.address("gateway"), threads) as load:
        start = time.monotonic()
        load.wait(start, lambda got: len(got) >= window, within_s=120)
        assert all(o.full for o in load.since(start)), "not full before any fault"
        kill9(stack, "ranking")
        killed = time.monotonic()
        # Down: queries and histories are answered degraded, user-only ones refused.
        load.wait(
            killed,
            lambda got: sum("ranking_unavailable" in o.reasons for o in got) >= window,
            within_s=60,
        )
        stack.start("ranking")
        recovers(load, time.monotonic(), window)
    down = load.since(killed)
    check_bounded(load.outcomes, {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE})
    # Only a user alone, whose candidates only CF could propose, is refused.
    refused = {o.kind for o in load.outcomes if o.code == grpc.StatusCode.UNAVAILABLE}
    assert refused == {"user"} and any(o.code != grpc.StatusCode.OK for o in down)
    print(summary("ranking kill -9", load.outcomes))


def test_retrieval_stalled_under_load_ends_every_call_in_time_then_recovers(
    faulty_stack: Launcher, scale: Scale
) -> None:
    stack, threads = faulty_stack, scale.pick(3, 6)
    window = scale.pick(12, 60)
    # Long enough for each thread's call in flight to time out and a whole next call to start
    # and time out inside the stall (one budget was racy on a busy machine).
    stall_s = scale.pick(2 * BUDGET_S + 4, 4 * BUDGET_S)
    with Load(stack.address("gateway"), threads) as load:
        start = time.monotonic()
        load.wait(start, lambda got: len(got) >= window, within_s=120)
        assert all(o.full for o in load.since(start)), "not full before any fault"
        stack.send("retrieval", signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            time.sleep(stall_s)
        finally:
            stack.send("retrieval", signal.SIGCONT)
        resumed = time.monotonic()
        recovers(load, resumed, window)
    codes = {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    check_bounded(load.outcomes, codes)
    # Calls that started and should have ended within the stall all felt it.
    stalled = [o for o in load.since(stopped) if o.ended < resumed]
    assert stalled and all(o.code == grpc.StatusCode.DEADLINE_EXCEEDED for o in stalled)
    # Without a caller's deadline, it was the gateway's budget that ended them.
    assert any(o.deadline_s is None for o in stalled)
    print(summary("retrieval SIGSTOP", load.outcomes))
