"""Rolling out a bundle version into the live root while Recommend calls keep coming: real
processes, real models, the sample bundle.

The stack polls CURRENT every half second, except one of retrieval and ranking, which polls
every SLOW_POLL_S: so for a few seconds the two serve different versions, and the gateway
must keep every answer to one of them. A new version is the live version's files under a
new name with its own manifest (hard links: versions are immutable), as a rebuild of the same
inputs would be; what matters here is that every service loads it beside the old one and that
no answer mixes the two.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2

from recsys.app.sample import sample_paths
from recsys.core.bundle import (
    CF_DIR,
    INDEX,
    MANIFEST,
    current_version,
    publish,
    staged_version,
)
from recsys.rpc.launcher import SERVICES, Launcher
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.integration.test_serving import scrape, value

SERVING = health_pb2.HealthCheckResponse.SERVING
# Loading a version beside the live one on a busy CPU takes tens of seconds; this only bounds
# a broken rollout.
SWITCH_TIMEOUT_S = 400.0
# Answers every request kind must give after all three services switched.
ANSWERS_AFTER = 6
STACK = {"bundle_poll_s": 0.5, "bundle_keep_previous_s": 600.0}
SLOW_POLL_S = 8.0


@pytest.fixture
def live_root(sample_bundle_root: Path, tmp_path: Path) -> Path:
    """A bundle root of this test's own holding the sample's version."""
    root = tmp_path / "bundle"
    version = current_version(sample_bundle_root)
    root.mkdir()
    shutil.copytree(sample_bundle_root / version, root / version, copy_function=os.link)
    publish(root, version)
    return root


def add_version(
    root: Path, base_version: str, name: str, damage: Callable[[Path], None] | None = None
) -> None:
    """Writes version `name` (the files of `base_version`, its own manifest) and publishes it;
    `damage(stage)` may break it first."""
    base = root / base_version
    with staged_version(root, name) as stage:
        shutil.copytree(
            base,
            stage,
            dirs_exist_ok=True,
            copy_function=os.link,
            ignore=lambda d, names: [MANIFEST] if Path(d) == base else [],
        )
        manifest = json.loads((base / MANIFEST).read_text())
        (stage / MANIFEST).write_text(json.dumps({**manifest, "version": name}))
        if damage is not None:
            damage(stage)
    publish(root, name)


def break_models(stage: Path) -> None:
    """Retrieval's index and ranking's CF factors become garbage (new files, not the links)."""
    for path in [stage / INDEX, *(p for p in (stage / CF_DIR).iterdir() if p.is_file())]:
        path.unlink()
        path.write_bytes(b"not a model")


@pytest.fixture(scope="module")
def requests() -> list[dict[str, object]]:
    """Every kind of Recommend: a search, a known user with history, a user id alone."""
    log = pd.read_csv(sample_paths()[1], dtype={"user_id": str, "item_id": str})
    user = str(log["user_id"].value_counts().index[0])
    history = [str(i) for i in log[log["user_id"] == user]["item_id"].tail(5)]
    return [
        {"query": "a light tent for camping", "k": 5},
        {"user_id": user, "history_item_ids": history, "k": 5},
        {"user_id": user, "k": 5},
    ]


@dataclass
class Traffic:
    """Recommend calls in a loop from two threads, and health checks of every service."""

    stack: Launcher
    requests: list[dict[str, object]]
    # (request kind, when the call started, the answer)
    answers: list[tuple[int, float, gateway_pb2.RecommendResponse]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    not_serving: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Traffic:
        self.threads = [threading.Thread(target=self._calls, args=(n,)) for n in range(2)]
        self.threads.append(threading.Thread(target=self._health))
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)

    def after(self, since: float) -> list[tuple[int, gateway_pb2.RecommendResponse]]:
        """Answers to the calls that started after `since` (time.monotonic())."""
        return [(kind, reply) for kind, started, reply in self.answers if started > since]

    def _calls(self, offset: int) -> None:
        with grpc.insecure_channel(self.stack.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            n = offset
            while not self.stop.is_set():
                kind = n % len(self.requests)
                started = time.monotonic()
                try:
                    reply = stub.Recommend(
                        gateway_pb2.RecommendRequest(**self.requests[kind]),  # type: ignore[arg-type]
                        timeout=60,
                    )
                    self.answers.append((kind, started, reply))
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
                n += 1

    def _health(self) -> None:
        while not self.stop.wait(0.2):
            for name in SERVICES:
                status = self.stack.health(name)
                if status != SERVING:
                    self.not_serving.append(f"{name}: {status}")


def wait_for(condition: Callable[[], bool], what: str, stack: Launcher) -> None:
    deadline = time.monotonic() + SWITCH_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {n}\n{stack.log_tail(n)}" for n in SERVICES)
            raise AssertionError(f"{what} within {SWITCH_TIMEOUT_S:.0f}s\n{logs}")
        time.sleep(0.5)


def live_version(stack: Launcher, name: str) -> set[str]:
    """The versions `recsys_bundle_info` marks live on a service (one, unless broken)."""
    text = scrape(stack, name)
    return {
        line.split('version="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("recsys_bundle_info{") and line.endswith(" 1.0")
    }


def retrieval_stub(stack: Launcher) -> tuple[grpc.Channel, retrieval_pb2_grpc.RetrievalServiceStub]:
    channel = grpc.insecure_channel(stack.address("retrieval"))
    return channel, retrieval_pb2_grpc.RetrievalServiceStub(channel)


def client_calls(stack: Launcher, code: str) -> float:
    """The gateway's calls to retrieval and ranking that ended with `code`."""
    text = scrape(stack, "gateway")
    return sum(
        value(text, "grpc_client_handled_total", **labels)
        for labels in (
            {"grpc_type": "unary", "grpc_service": f"recsys.v1.{service}", "grpc_method": method}
            | {"grpc_code": code}
            for service, method in (
                ("RetrievalService", "Search"),
                ("RetrievalService", "GetItems"),
                ("RankingService", "Rank"),
                ("RankingService", "RecallCandidates"),
            )
        )
    )


@pytest.mark.parametrize(
    "slow", ["ranking", "retrieval"], ids=["retrieval switches first", "ranking switches first"]
)
def test_a_new_version_rolls_out_under_load_without_a_failed_or_mixed_answer(
    own_stack: Callable[..., Launcher],
    live_root: Path,
    requests: list[dict[str, object]],
    slow: str,
) -> None:
    stack = own_stack(*(n for n in SERVICES if n != slow), wait=False, bundle=live_root, **STACK)
    stack.env["RECSYS_BUNDLE_POLL_S"] = str(SLOW_POLL_S)
    stack.start(slow, wait=False)
    for name in SERVICES:
        stack.wait_serving(name, timeout=240)
    old = current_version(live_root)
    channel, retrieval = retrieval_stub(stack)
    telescope = retrieval_pb2.UpsertItemsRequest(
        items=[
            common_pb2.Item(
                item_id="x-telescope", title="Brass telescope for stargazing, model QX7719"
            )
        ]
    )
    assert retrieval.UpsertItems(telescope, timeout=60).upserted == 1
    deleted = (
        retrieval.Search(
            retrieval_pb2.SearchRequest(query_text="a light tent for camping", top_k=1), timeout=60
        )
        .hits[0]
        .item_id
    )
    retrieval.DeleteItems(retrieval_pb2.DeleteItemsRequest(item_ids=[deleted]), timeout=60)

    with Traffic(stack, requests) as traffic:
        wait_for(lambda: len(traffic.answers) >= len(requests), "answers before the rollout", stack)
        add_version(live_root, old, "v-next")
        for name in SERVICES:
            wait_for(
                lambda n=name: live_version(stack, n) == {"v-next"}, f"{name} on v-next", stack
            )
        switched = time.monotonic()
        wait_for(
            lambda: len(traffic.after(switched)) >= ANSWERS_AFTER,
            "answers after the rollout",
            stack,
        )

    assert traffic.failures == []
    assert traffic.not_serving == []
    versions = [r.versions for _, _, r in traffic.answers]
    mixed = [v for v in versions if v.ranking_bundle_version not in ("", v.bundle_version)]
    assert mixed == []
    seen = {v.bundle_version for v in versions}
    assert seen == {old, "v-next"}, seen  # the stream crossed the switch
    after = traffic.after(switched)
    assert {r.versions.bundle_version for _, r in after} == {"v-next"}
    ranked = [r for _, r in after if not r.degraded]
    assert ranked and {r.versions.ranking_bundle_version for r in ranked} == {"v-next"}
    assert {kind for kind, _ in after} == set(range(len(requests)))
    if slow == "ranking":  # Rank pinned to retrieval's new version was refused, then repinned
        assert client_calls(stack, "FAILED_PRECONDITION") > 0

    # The online changes made under the old version are in force in the new one.
    info = retrieval.GetIndexInfo(retrieval_pb2.GetIndexInfoRequest(), timeout=60)
    assert info.bundle_version == "v-next"
    hits = retrieval.Search(
        retrieval_pb2.SearchRequest(query_text="Brass telescope for stargazing", top_k=1),
        timeout=60,
    ).hits
    assert [h.item_id for h in hits] == ["x-telescope"]
    # ... in the new version's lexical index too: the model number only it holds finds it.
    model = retrieval.Search(
        retrieval_pb2.SearchRequest(query_text="QX7719", top_k=1), timeout=60
    ).hits
    assert [(h.item_id, "lexical" in h.found_by) for h in model] == [("x-telescope", True)]
    gone = retrieval.GetItems(retrieval_pb2.GetItemsRequest(item_ids=[deleted]), timeout=60)
    assert list(gone.missing_item_ids) == [deleted] and gone.bundle_version == "v-next"
    assert all(deleted not in [i.item_id for i in r.items] for _, _, r in traffic.answers)
    channel.close()


def test_a_version_that_fails_to_load_leaves_the_old_one_serving_and_is_counted(
    own_stack: Callable[..., Launcher], live_root: Path, requests: list[dict[str, object]]
) -> None:
    stack = own_stack(bundle=live_root, **STACK)
    old = current_version(live_root)
    add_version(live_root, old, "v-broken", damage=break_models)
    for name in ("retrieval", "ranking"):
        wait_for(
            lambda n=name: (
                value(scrape(stack, n), "recsys_bundle_load_failures_total", service=n) == 1
            ),
            f"{name} counting the failed load",
            stack,
        )
        assert live_version(stack, name) == {old}
        assert stack.health(name) == SERVING
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for request in requests:
            reply = stub.Recommend(gateway_pb2.RecommendRequest(**request), timeout=60)  # type: ignore[arg-type]
            assert reply.versions.bundle_version == old
    assert "bundle v-broken failed to load" in stack.log_tail("retrieval", 20000)

    # It is not tried again; the next good version is.
    add_version(live_root, old, "v-fixed")
    for name in ("retrieval", "ranking"):
        wait_for(lambda n=name: live_version(stack, n) == {"v-fixed"}, f"{name} on v-fixed", stack)
        assert value(scrape(stack, name), "recsys_bundle_load_failures_total", service=name) == 1
