"""Starting services: one per process, or all three as child processes of `recsys serve all`."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from recsys.errors import InvalidInput
from recsys.serving import Service, run
from recsys.settings import Settings

log = logging.getLogger(__name__)

START_ORDER = ("retrieval", "ranking", "gateway")


def make_service(name: str, settings: Settings) -> Service:
    """The Service object for a short name; imports only that service's code."""
    if name == "retrieval":
        from retrieval_service.servicer import RetrievalService

        return RetrievalService(settings)
    if name == "ranking":
        from ranking_service.servicer import RankingService

        return RankingService(settings)
    if name == "gateway":
        from gateway.servicer import GatewayService

        return GatewayService(settings)
    raise InvalidInput(f"service {name!r}: expected retrieval, ranking or gateway")


def ports(name: str, settings: Settings) -> tuple[int, int]:
    """(gRPC port, metrics port) of a service."""
    return (
        getattr(settings, f"{name}_port"),
        getattr(settings, f"{name}_metrics_port"),
    )


def run_service(name: str, settings: Settings) -> None:
    """Serves one service in this process until SIGTERM/SIGINT."""
    if name != "gateway" and settings.bundle is None:
        raise InvalidInput("--bundle (or RECSYS_BUNDLE) is required")
    if settings.bundle is not None:
        from recsys.bundle import Bundle

        Bundle.open(settings.bundle)  # fail fast with one line, before binding ports
    port, metrics_port = ports(name, settings)
    run(make_service(name, settings), settings, port, metrics_port)


def child_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build the same Settings."""
    env = dict(os.environ)
    for field, value in settings.model_dump(exclude_none=True).items():
        env[f"RECSYS_{field.upper()}"] = str(value)
    # Each service is its own server; within one machine they should not fight over cores.
    return env


def spawn(name: str, settings: Settings) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "recsys.cli", "serve", name], env=child_env(settings)
    )


def run_all(settings: Settings) -> int:
    """Runs retrieval, ranking and gateway as three child processes; stops all when one exits."""
    if settings.bundle is None:
        raise InvalidInput("--bundle (or RECSYS_BUNDLE) is required")
    from recsys.bundle import Bundle

    Bundle.open(settings.bundle)
    children = {name: spawn(name, settings) for name in START_ORDER}
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while True:
        exited = {n: c.returncode for n, c in children.items() if c.poll() is not None}
        if exited and not stopping:
            name, code = next(iter(exited.items()))
            log.error("%s exited with code %s; stopping the others", name, code)
            forward(signal.SIGTERM, None)
        if len(exited) == len(children):
            break
        time.sleep(0.2)
    return 0 if stopping and code == 0 else (code or 1)
