"""Deploy checks: render the kustomize overlays, the metrics the services export, and the PromQL
of the Grafana dashboard and the alert rules with template variables substituted.

`dashboard_queries()` and `alert_expressions()` are plain functions so a live test can run the
same expressions against a real Prometheus scraping the real services.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "mtls", "shared-log", "milvus")
DASHBOARD = DEPLOY / "grafana" / "recsys-dashboard.json"
RULES = DEPLOY / "prometheus" / "prometheusrule.yaml"
SCHEMAS = DEPLOY / "schemas"
# A Kubernetes version whose schemas kubernetes-validate ships (see its --help for the list).
K8S_VERSION = "1.32.0"

# The metric families the services export: name -> type. The ONE list the checks read; every
# metric the dashboard and the alerts use must be here (histograms expand to _bucket/_sum/_count).
EXPORTED_METRICS: dict[str, str] = {
    # all three servers
    "grpc_server_started_total": "counter",
    "grpc_server_handled_total": "counter",
    "grpc_server_handling_seconds": "histogram",
    "recsys_bundle_info": "gauge",
    "recsys_bundle_loaded_timestamp_seconds": "gauge",
    "recsys_bundle_load_failures_total": "counter",
    "recsys_serving": "gauge",
    # gateway
    "grpc_client_started_total": "counter",
    "grpc_client_handled_total": "counter",
    "grpc_client_handling_seconds": "histogram",
    "recsys_stage_duration_seconds": "histogram",
    "recsys_candidates": "histogram",
    "recsys_degraded_responses_total": "counter",
    # ranking
    "recsys_ranking_batch_size": "histogram",
    "recsys_ranking_queue_depth": "gauge",
    "recsys_ranking_inference_seconds": "histogram",
    # retrieval
    "recsys_index_items": "gauge",
    # the shared catalog change log (0 on the local journal): positions and failed reads
    "recsys_change_log_applied_position": "gauge",
    "recsys_change_log_head_position": "gauge",
    "recsys_change_log_errors_total": "counter",
    # stored online changes (journal, snapshot, change log) found corrupt: DATA_LOSS
    "recsys_retrieval_corrupt_records_total": "counter",
    # any server that takes writes (retrieval): accepted UpsertItems/DeleteItems by caller
    "recsys_writes_total": "counter",
}
# Series Prometheus adds for every target it scrapes.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_GRPC = ("grpc_type", "grpc_service", "grpc_method")
# Labels of each family (histograms also carry `le`); keep in step with EXPORTED_METRICS.
EXPORTED_LABELS: dict[str, tuple[str, ...]] = {
    "grpc_server_started_total": _GRPC,
    "grpc_server_handled_total": (*_GRPC, "grpc_code"),
    "grpc_server_handling_seconds": (*_GRPC, "grpc_code"),
    "grpc_client_started_total": _GRPC,
    "grpc_client_handled_total": (*_GRPC, "grpc_code"),
    "grpc_client_handling_seconds": (*_GRPC, "grpc_code"),
    "recsys_bundle_info": ("service", "version"),
    "recsys_bundle_loaded_timestamp_seconds": ("service",),
    "recsys_bundle_load_failures_total": ("service",),
    "recsys_serving": ("service",),
    "recsys_stage_duration_seconds": ("stage",),
    "recsys_candidates": ("stage",),
    "recsys_degraded_responses_total": ("reason",),
    "recsys_writes_total": ("identity", "method"),
}
# Labels Prometheus attaches to every series of a target (PodMonitor: namespace, pod, ...).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})


def exported_series() -> set[str]:
    """Every series name a query may select: the families, with histogram suffixes."""
    names: set[str] = set(SCRAPE_SERIES)
    for name, kind in EXPORTED_METRICS.items():
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        else:
            names.add(name)
    return names


@dataclass(frozen=True)
class ServiceFacts:
    port_setting: str
    metrics_port_setting: str
    health_name: str


SERVICES: dict[str, ServiceFacts] = {
    "gateway": ServiceFacts("gateway_port", "gateway_metrics_port", "recsys.v1.GatewayService"),
    "retrieval": ServiceFacts(
        "retrieval_port", "retrieval_metrics_port", "recsys.v1.RetrievalService"
    ),
    "ranking": ServiceFacts("ranking_port", "ranking_metrics_port", "recsys.v1.RankingService"),
}

# Grafana variables → values for running a query outside Grafana.
TEMPLATE_VALUES = {
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
    "namespace": ".*",
}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_THRESHOLD = re.compile(
    r"^(?P<query>.*?)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<value>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$",
    re.DOTALL,
)


def substitute(expr: str) -> str:
    """Replaces Grafana template variables; an unknown variable is an error."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in TEMPLATE_VALUES:
            raise KeyError(f"unknown template variable ${name} in {expr!r}")
        return TEMPLATE_VALUES[name]

    return _VARIABLE.sub(value, expr)


def _balanced(text: str) -> bool:
    depth = 0
    for char in text:
        depth += char in "({["
        depth -= char in ")}]"
        if depth < 0:
            return False
    return depth == 0


def split_threshold(expr: str) -> tuple[str, str, float]:
    """`<query> <op> <number>` → (query, op, number); the comparison must be the outermost one."""
    text = " ".join(expr.split())
    match = _THRESHOLD.match(text)
    if match is None or not _balanced(match["query"]):
        raise ValueError(f"alert expression is not `<query> <op> <number>`: {text!r}")
    return match["query"], match["op"], float(match["value"])


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for panel in panels:
        out.append(panel)
        out.extend(_panels(panel.get("panels", [])))
    return out


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard's panels, variables substituted."""
    return [
        substitute(" ".join(target["expr"].split()))
        for panel in _panels(dashboard()["panels"])
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["spec"]["groups"] for rule in group["rules"] if "alert" in rule]


def alert_expressions() -> list[tuple[str, str]]:
    """(alert name, expression without its threshold comparison) for every alert rule."""
    return [(rule["alert"], split_threshold(rule["expr"])[0]) for rule in alert_rules()]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "offset", "bool", "inf", "nan", "group_left", "group_right"}
)


def metric_names(expr: str) -> set[str]:
    """The series names an expression selects (strings, matchers, ranges and clauses removed)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {name for name in _IDENT.findall(text) if name.lower() not in _KEYWORDS}


def family(series: str) -> str:
    """The metric family of a series name (histogram suffixes removed)."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = series.removesuffix(suffix)
        if base != series and EXPORTED_METRICS.get(base) == "histogram":
            return base
    return series


def selector_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names matched) for every `name{...}` selector of an expression."""
    text = _STRING.sub('""', expr)
    return [
        (name, set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers)))
        for name, matchers in re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^{}]*)\}", text)
    ]


def known_labels(series: str) -> set[str]:
    base = family(series)
    labels = set(TARGET_LABELS) | set(EXPORTED_LABELS.get(base, ()))
    if base != series and series.endswith("_bucket"):
        labels.add("le")
    return labels


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize deploy/k8s/overlays/<overlay>` as parsed objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH: cannot render the kustomize overlays")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def objects(overlay: str) -> tuple[dict[str, Any], ...]:
    return render(overlay)


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not on PATH (Debian: apt-get install prometheus)")
    return path
