"""Starts the services as child processes and waits until health says SERVING.

The one way to run the stack from another process: `recsys serve all`, `recsys demo`, the tests
and the benchmarks all use `Launcher`.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.core.settings import Settings
from recsys.rpc.tls import ClientCertificates

SERVICES = ("retrieval", "ranking", "gateway")  # start order: the gateway waits for retrieval
FULL_NAMES = {
    "retrieval": "recsys.v1.RetrievalService",
    "ranking": "recsys.v1.RankingService",
    "gateway": "recsys.v1.GatewayService",
}
SERVING = health_pb2.HealthCheckResponse.SERVING


# Below Linux's default ephemeral range (32768-60999): a port the kernel hands out for outgoing
# connections can be taken by a client while a stopped service is down, so a restart on the same
# port would find it in use.
PORT_RANGE = (20000, 32767)


def free_port() -> int:
    """A TCP port nothing is bound to right now (loopback), outside the ephemeral range."""
    low, high = PORT_RANGE
    for port in random.sample(range(low, high + 1), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def on_free_ports(settings: Settings) -> Settings:
    """`settings` on loopback with a free port for every server and metrics endpoint."""
    ports: dict[str, Any] = {}
    for name in SERVICES:
        ports[f"{name}_port"] = free_port()
        ports[f"{name}_metrics_port"] = free_port()
    return settings.model_copy(
        update={
            **ports,
            "host": "127.0.0.1",
            "retrieval_address": f"127.0.0.1:{ports['retrieval_port']}",
            "ranking_address": f"127.0.0.1:{ports['ranking_port']}",
        }
    )


def child_env(settings: Settings, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a child process build the same Settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude_none=True).items():
        env[f"RECSYS_{name.upper()}"] = str(value)
    return env | (extra or {})


def check_health(
    address: str,
    service: str = "",
    timeout: float = 2.0,
    certificates: ClientCertificates | None = None,
) -> int:
    """The health status of `service` ("" = the server as a whole) at `address`: plaintext, or
    TLS presenting the client certificate of `certificates`."""
    if certificates is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(
            address, certificates.credentials(), options=certificates.options()
        )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=service)
        return int(stub.Check(request, timeout=timeout).status)


@dataclass
class Launcher:
    """Retrieval, ranking and gateway as `recsys serve NAME` children sharing one Settings."""

    settings: Settings
    log_dir: Path | None = None  # children write to LOG_DIR/<name>.log; None: this terminal
    env: dict[str, str] = field(default_factory=dict)  # added to the children's environment
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def port(self, name: str) -> int:
        return int(getattr(self.settings, f"{name}_port"))

    def metrics_port(self, name: str) -> int:
        return int(getattr(self.settings, f"{name}_metrics_port"))

    def address(self, name: str) -> str:
        """Where to connect to a service (a wildcard bind is reached over loopback)."""
        return self._local(self.port(name))

    def _local(self, port: int) -> str:
        host = self.settings.host
        return f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{port}"

    def start(self, name: str, wait: bool = True) -> None:
        output: Any = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            output = (self.log_dir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "recsys", "serve", name],
            env=child_env(self.settings, self.env),
            stdout=output,
            stderr=subprocess.STDOUT if output is not None else None,
        )
        if output is not None:
            output.close()  # the child holds its own copy
        if wait:
            self.wait_serving(name)

    def start_all(self, timeout: float = 300.0) -> None:
        """Starts every service at once (they load in parallel), then waits for each."""
        for name in SERVICES:
            self.start(name, wait=False)
        for name in SERVICES:
            self.wait_serving(name, timeout)

    def health(self, name: str, service: str = "") -> int:
        """`name`'s health: with TLS on, on its plaintext health-only port when one is set, else
        over TLS presenting the settings' client certificate (mTLS servers refuse plaintext)."""
        if not self.settings.tls_enabled():
            return check_health(self.address(name), service)
        health_port = self.settings.health_port(name)
        if health_port:
            return check_health(self._local(health_port), service)
        # Read at every check, so a certificate rotated while waiting is picked up.
        certificates = ClientCertificates(self.settings)
        return check_health(self.address(name), service, certificates=certificates)

    def wait_serving(self, name: str, timeout: float = 300.0) -> None:
        """Returns once `name` reports SERVING; raises if it exits or the timeout passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.log_tail(name)}")
            try:
                if self.health(name) == SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{name} not SERVING after {timeout:.0f}s\n{self.log_tail(name)}")

    def send(self, name: str, sig: int) -> None:
        """Sends a signal to a running service (SIGKILL, SIGSTOP, … for fault tests)."""
        proc = self.procs.get(name)
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def stop(self, name: str, timeout: float = 60.0) -> int | None:
        """SIGTERM (the service drains), then SIGKILL after `timeout`; returns the exit code."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def exited(self) -> dict[str, int]:
        """Services whose process has ended, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def log_tail(self, name: str, chars: int = 4000) -> str:
        if self.log_dir is None:
            return ""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def close(self) -> None:
        """Stops every service, all at once (each drains in parallel)."""
        for name in self.procs:
            self.send(name, signal.SIGTERM)
        for name in list(self.procs):
            self.stop(name)


@contextmanager
def launched(settings: Settings, **options: Any) -> Iterator[Launcher]:
    """All three services started and SERVING for the `with` block, stopped after it."""
    launcher = Launcher(settings, **options)
    try:
        launcher.start_all()
        yield launcher
    finally:
        launcher.close()
