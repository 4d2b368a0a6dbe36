"""The three real servers as child processes on free loopback ports (used by several test packages)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("retrieval", "ranking", "gateway")
FULL_NAMES = {
    "retrieval": "recsys.v1.RetrievalService",
    "ranking": "recsys.v1.RankingService",
    "gateway": "recsys.v1.GatewayService",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Stack:
    """Three servers over one bundle; each can be stopped and started again."""

    bundle: Path
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    metrics_ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in SERVICES:
            self.ports[name] = free_port()
            self.metrics_ports[name] = free_port()

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "RECSYS_BUNDLE": str(self.bundle),
                "RECSYS_STATE_DIR": str(self.workdir / "state"),
                "RECSYS_HOST": "127.0.0.1",
                "RECSYS_DEVICE": "cpu",
                "RECSYS_GRACE_PERIOD_S": "1",
                "RECSYS_RETRIEVAL_ADDRESS": f"127.0.0.1:{self.ports['retrieval']}",
                "RECSYS_RANKING_ADDRESS": f"127.0.0.1:{self.ports['ranking']}",
                "OMP_NUM_THREADS": "1",
            }
        )
        for name in SERVICES:
            env[f"RECSYS_{name.upper()}_PORT"] = str(self.ports[name])
            env[f"RECSYS_{name.upper()}_METRICS_PORT"] = str(self.metrics_ports[name])
        return env

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def start(self, name: str, wait: bool = True) -> None:
        log = (self.workdir / f"{name}.log").open("ab")
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "recsys.cli", "serve", name],
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        if wait:
            self.wait_serving(name)

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def health(self, name: str, service: str = "") -> int:
        with grpc.insecure_channel(self.address(name)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            return int(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status)

    def wait_serving(self, name: str, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")
            try:
                if self.health(name) == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{name} not SERVING after {timeout}s:\n{self.log_tail(name)}")

    def log_tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def channel(self, name: str) -> grpc.Channel:
        return grpc.insecure_channel(self.address(name))

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)
