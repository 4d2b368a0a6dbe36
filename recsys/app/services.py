"""`recsys serve`: one service in this process, or all three as children of `recsys serve all`."""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

from recsys.core.bundle import Bundle
from recsys.core.errors import InvalidInput
from recsys.core.settings import Settings
from recsys.rpc.launcher import SERVICES, Launcher
from recsys.rpc.server import Service, run

log = logging.getLogger(__name__)


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
    raise InvalidInput(f"service {name!r}: expected one of {', '.join(SERVICES)}")


def run_service(name: str, settings: Settings) -> None:
    """Serves one service in this process until SIGTERM/SIGINT."""
    if name != "gateway":
        _open_bundle(settings)  # fail fast with one line, before binding ports
    port = getattr(settings, f"{name}_port")
    metrics_port = getattr(settings, f"{name}_metrics_port")
    run(make_service(name, settings), settings, port, metrics_port, settings.health_port(name))


def run_all(settings: Settings) -> int:
    """Runs the three services as child processes; stops all when one exits or on a signal."""
    _open_bundle(settings)
    launcher = Launcher(settings)
    for name in SERVICES:
        launcher.start(name, wait=False)
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for name in SERVICES:
            launcher.send(name, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    code = 0
    while True:
        exited = launcher.exited()
        if exited and not stopping:
            name, code = next(iter(exited.items()))
            log.error("%s exited with code %s; stopping the others", name, code)
            forward(signal.SIGTERM, None)
        if len(exited) == len(SERVICES):
            break
        time.sleep(0.2)
    return 0 if stopping and code == 0 else (code or 1)


def _open_bundle(settings: Settings) -> None:
    if settings.bundle is None:
        raise InvalidInput("--bundle (or RECSYS_BUNDLE) is required")
    Bundle.open(settings.bundle)
