"""What the chaos suites share: their size (CI or `--chaos-full`), quick-reconnecting channels
and process faults on the Launcher's children."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TypeVar

import grpc
import pytest

from recsys.rpc.launcher import Launcher

T = TypeVar("T")

# Like the gateway's own channels (recsys.rpc.channels): gRPC's default reconnect backoff grows
# to 120 s, so a client would keep failing long after a killed service is back.
QUICK_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass(frozen=True)
class Scale:
    """CI size (seconds, the default) or full size (`pytest tests/chaos --chaos-full`)."""

    full: bool

    def pick(self, ci: T, full: T) -> T:
        return full if self.full else ci


@pytest.fixture(scope="session")
def scale(request: pytest.FixtureRequest) -> Scale:
    return Scale(bool(request.config.getoption("--chaos-full")))


def quick_channel(address: str) -> grpc.Channel:
    """A plaintext channel that reconnects within a second once its peer is back."""
    return grpc.insecure_channel(address, options=QUICK_RECONNECT)


def kill9(launcher: Launcher, name: str) -> None:
    """SIGKILL, then reap the process, so its port and journal are free for a restart."""
    proc = launcher.procs[name]
    launcher.send(name, signal.SIGKILL)
    proc.wait(timeout=30)
