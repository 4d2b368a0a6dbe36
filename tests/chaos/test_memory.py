"""Resident memory of each service over thousands of mixed requests stays within a bound.

One check, `rss_growth` then `grown_past`, runs against the three services and against a
tiny process that keeps memory for every request (the negative control): the same code that
passes the services must catch that leak, and pass the same process when it keeps nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import grpc
import pandas as pd
import pytest

from recsys.app.sample import sample_paths, sample_queries_path
from recsys.rpc.launcher import SERVICES, Launcher
from recsys.v1 import gateway_pb2_grpc, ranking_pb2_grpc, retrieval_pb2_grpc
from recsys.v1.gateway_pb2 import RecommendRequest
from recsys.v1.ranking_pb2 import Candidate, RankContext, RankRequest, RecallCandidatesRequest
from recsys.v1.retrieval_pb2 import GetItemsRequest, SearchRequest
from tests.chaos.conftest import Scale

MIB = 1024 * 1024
# Growth allowed after the warm-up, whatever the request count. Warm-up growth levels off as
# allocator pools fill and the model runtimes settle (ranking on the sample, slices of 500
# requests after 300: +31, +11, +5, +0.3 MiB); a leak keeps growing. After WARMUP requests,
# 2000 more grew ranking by 11 MiB, retrieval by 9 MiB (one 6 MiB step) and the gateway by
# under 1 MiB. The bound is about three times that: keeping 16 KB per request (a few protos,
# tensors or a traceback) crosses it within 2000 requests, 3.3 KB within --chaos-full's 10000.
BOUND = 32 * MIB
WARMUP = 1000
THREADS = 4  # concurrent callers: the services' worker threads all get work, as in serving
CALL_TIMEOUT_S = 60.0  # a hung service fails the test instead of stalling it
OK, NOT_FOUND = grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


def rss_bytes(pid: int) -> int:
    """Resident set size of a live process (VmRSS of /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024  # in kB
    raise ValueError(f"/proc/{pid}/status has no VmRSS: not a live user process")


@dataclass(frozen=True)
class Growth:
    """A process's RSS after the warm-up and after each slice of the measured requests."""

    warm: int
    samples: tuple[int, ...]

    @property
    def grown(self) -> int:
        return self.samples[-1] - self.warm

    def __str__(self) -> str:
        trace = " → ".join(f"{s / MIB:.1f}" for s in self.samples)
        return f"{self.warm / MIB:.1f} → {trace} MiB (+{self.grown / MIB:.1f})"


def rss_growth(
    pids: Mapping[str, int],
    send: Callable[[int], None],
    warmup: int,
    requests: int,
    slices: int = 4,
) -> dict[str, Growth]:
    """Sends requests 0..warmup-1, then `requests` more, from THREADS callers; each process's
    RSS is read after the warm-up and after each of `slices` equal parts of the rest."""
    warm: dict[str, int] = {}
    samples: dict[str, list[int]] = {name: [] for name in pids}
    step = requests // slices
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(send, range(warmup)))  # re-raises the first failed request
        warm = {name: rss_bytes(pid) for name, pid in pids.items()}
        for first in range(warmup, warmup + slices * step, step):
            list(pool.map(send, range(first, first + step)))
            for name, pid in pids.items():
                samples[name].append(rss_bytes(pid))
    return {name: Growth(warm[name], tuple(samples[name])) for name in pids}


def grown_past(growth: Mapping[str, Growth], bound: int) -> dict[str, str]:
    """The processes that grew by more than `bound` bytes after their warm-up."""
    return {name: str(g) for name, g in growth.items() if g.grown > bound}


# -- the services -------------------------------------------------------------------------------


@contextmanager
def mixed_requests(stack: Launcher) -> Iterator[Callable[[int], None]]:
    """Request number i → one of nine calls to the three services, valid ones and refused ones.

    Queries, users and items vary, so anything kept per distinct request would show too.
    """
    catalog_csv, log_csv = sample_paths()
    catalog = pd.read_csv(catalog_csv, dtype=str).fillna("")
    log = pd.read_csv(log_csv, dtype={"user_id": str, "item_id": str})
    lines = sample_queries_path().read_text().splitlines()
    queries = [json.loads(line)["query"] for line in lines] + catalog["title"].tolist()
    users = log["user_id"].unique().tolist()
    histories = log.groupby("user_id")["item_id"].apply(lambda s: s.tail(5).tolist()).tolist()
    ids = catalog["item_id"].tolist()
    candidates = [
        Candidate(item_id=item_id, text=title)
        for item_id, title in zip(catalog["item_id"][:20], catalog["title"][:20], strict=True)
    ]

    def pick(values: list[str], i: int) -> str:
        return values[(i * 7919) % len(values)]

    with ExitStack() as channels:
        channel = {
            name: channels.enter_context(grpc.insecure_channel(stack.address(name)))
            for name in SERVICES
        }
        gateway = gateway_pb2_grpc.GatewayServiceStub(channel["gateway"])
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(channel["retrieval"])
        ranking = ranking_pb2_grpc.RankingServiceStub(channel["ranking"])
        ok, unknown_user, refused = {OK}, {OK, NOT_FOUND}, {INVALID_ARGUMENT}
        # (method, request i, the codes it may end with): CF may not know a user of the log.
        mix: list[tuple[Callable[..., object], Callable[[int], object], set[grpc.StatusCode]]] = [
            (gateway.Recommend, lambda i: RecommendRequest(query=pick(queries, i), k=5), ok),
            (
                gateway.Recommend,
                lambda i: RecommendRequest(history_item_ids=histories[i % len(histories)], k=5),
                ok,
            ),
            (
                gateway.Recommend,
                lambda i: RecommendRequest(user_id=pick(users, i), k=5),
                unknown_user,
            ),
            (
                retrieval.Search,
                lambda i: SearchRequest(query_text=pick(queries, i), top_k=10, include_text=True),
                ok,
            ),
            (retrieval.GetItems, lambda i: GetItemsRequest(item_ids=[pick(ids, i), "nope"]), ok),
            (
                ranking.RecallCandidates,
                lambda i: RecallCandidatesRequest(user_id=pick(users, i), top_k=20),
                unknown_user,
            ),
            (
                ranking.Rank,
                lambda i: RankRequest(
                    context=RankContext(query=pick(queries, i)), candidates=candidates
                ),
                ok,
            ),
            (
                gateway.Recommend,
                lambda i: RecommendRequest(query=pick(queries, i), k=5000),
                refused,
            ),
            (retrieval.Search, lambda i: SearchRequest(query_text="x", top_k=10**6), refused),
        ]

        def send(i: int) -> None:
            method, request, codes = mix[i % len(mix)]
            try:
                method(request(i), timeout=CALL_TIMEOUT_S)
                code = OK
            except grpc.RpcError as exc:
                code = exc.code()  # type: ignore[attr-defined]
            assert code in codes, f"request {i} ended {code.name}"

        yield send


def test_service_memory_stays_bounded_over_mixed_requests(
    own_stack: Callable[..., Launcher], scale: Scale
) -> None:
    # A budget no busy machine runs out of: a DEADLINE_EXCEEDED here would be noise.
    stack = own_stack(default_budget_ms=30_000)
    pids = {name: stack.procs[name].pid for name in SERVICES}
    requests = scale.pick(2000, 10000)
    with mixed_requests(stack) as send:
        growth = rss_growth(pids, send, WARMUP, requests)
    print(f"\nRSS over {requests} mixed requests:")
    for name, g in growth.items():
        print(f"  {name}: {g}")
    assert not grown_past(growth, BOUND), growth
    assert not stack.exited()


# -- the negative control ------------------------------------------------------------------------

# Keeps `leak` bytes per request line, written so every page is touched (resident).
LEAKER = """
import sys
leak, kept = int(sys.argv[1]), []
for line in sys.stdin:
    kept.append(bytes([len(kept) % 251]) * leak)
    sys.stdout.write("ok\\n")
    sys.stdout.flush()
"""


@pytest.fixture
def leaker() -> Iterator[Callable[[int], tuple[int, Callable[[int], None]]]]:
    """Starts tiny processes that keep `leak` bytes per request: (pid, send)."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(leak: int) -> tuple[int, Callable[[int], None]]:
        proc = subprocess.Popen(
            [sys.executable, "-c", LEAKER, str(leak)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        procs.append(proc)
        lock = threading.Lock()  # one request at a time over the pipe

        def send(i: int) -> None:
            assert proc.stdin is not None and proc.stdout is not None
            with lock:
                proc.stdin.write(b"request\n")
                proc.stdin.flush()
                assert proc.stdout.readline() == b"ok\n"

        return proc.pid, send

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("leaks", [False, True], ids=["keeps-nothing", "leaks"])
def test_the_same_check_catches_a_leak_per_request(
    leaker: Callable[[int], tuple[int, Callable[[int], None]]], scale: Scale, leaks: bool
) -> None:
    requests = scale.pick(2000, 10000)
    # Twice the bound over the run: the check must see it; keeping nothing, it must pass.
    per_request = 2 * BOUND // requests if leaks else 0
    pid, send = leaker(per_request)
    growth = rss_growth({"leaker": pid}, send, WARMUP, requests)
    caught = grown_past(growth, BOUND)
    assert bool(caught) == leaks, growth
    print(f"\nleaker keeping {per_request} B/request: {growth['leaker']}")
