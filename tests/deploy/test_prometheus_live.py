"""A real Prometheus scrapes the real services; every dashboard query and alert expression returns data.

So a renamed metric or label breaks the build instead of a dashboard.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from recsys.rpc.launcher import SERVICES, Launcher, free_port
from recsys.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, retrieval_pb2, retrieval_pb2_grpc
from tests.deploy.conftest import EXPORTED_METRICS, alert_expressions, dashboard_queries

PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 1


def send_traffic(stack: Launcher, seconds: float) -> None:
    """OK and INVALID_ARGUMENT calls on every service, spread over several scrapes."""
    end = time.monotonic() + seconds
    with (
        grpc.insecure_channel(stack.address("gateway")) as g,
        grpc.insecure_channel(stack.address("retrieval")) as r,
    ):
        gateway = gateway_pb2_grpc.GatewayServiceStub(g)
        retrieval = retrieval_pb2_grpc.RetrievalServiceStub(r)
        n = 0
        while time.monotonic() < end:
            gateway.Recommend(
                gateway_pb2.RecommendRequest(query=f"running shoes {n}", k=3), timeout=30
            )
            retrieval.Search(retrieval_pb2.SearchRequest(query_text="lamp", top_k=3), timeout=30)
            with pytest.raises(grpc.RpcError):
                gateway.Recommend(gateway_pb2.RecommendRequest(query="x", k=5000), timeout=30)
            n += 1
        item = common_pb2.Item(item_id="PROM-1", title="Prometheus Probe Lamp")
        retrieval.UpsertItems(retrieval_pb2.UpsertItemsRequest(items=[item]), timeout=30)


def query(port: int, expr: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", (expr, body)
    return list(body["data"]["result"])


@pytest.fixture(scope="module")
def prometheus(stack: Launcher, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    if PROMETHEUS is None:
        pytest.skip("prometheus binary not found (.ci/run installs Debian's prometheus package)")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                # Job names as the PodMonitors produce them (alerts match job=~"recsys-.*").
                "job_name": f"recsys-{name}",
                "static_configs": [{"targets": [f"127.0.0.1:{stack.metrics_port(name)}"]}],
            }
            for name in SERVICES
        ],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))  # JSON is valid YAML
    port = free_port()
    log = (workdir / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(port, proc, workdir / "prometheus.log")
        send_traffic(stack, seconds=8 * SCRAPE_INTERVAL_S)
        time.sleep(3 * SCRAPE_INTERVAL_S)  # let the last increments be scraped
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_ready(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log.read_text()[-3000:]}")
        try:
            if query(port, 'up{job=~"recsys-.*"} == 1') and len(query(port, "up == 1")) == 3:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"prometheus not scraping all three targets:\n{log.read_text()[-3000:]}")


def test_every_exported_family_the_checks_list_is_really_exported(prometheus: int) -> None:
    for family, kind in EXPORTED_METRICS.items():
        series = f"{family}_count" if kind == "histogram" else family
        assert query(prometheus, series), (
            f"{series} is listed in tests/deploy/conftest.py but not scraped"
        )


@pytest.mark.parametrize("expr", dashboard_queries())
def test_dashboard_query_returns_data(prometheus: int, expr: str) -> None:
    assert query(prometheus, expr), f"no data for dashboard query: {expr}"


@pytest.mark.parametrize(("alert", "expr"), alert_expressions())
def test_alert_expression_without_threshold_returns_data(
    prometheus: int, alert: str, expr: str
) -> None:
    assert query(prometheus, expr), f"alert {alert}: no data for {expr}"
