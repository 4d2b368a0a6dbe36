"""Prometheus metrics: the standard grpc_* families (server and client) and the recsys_* domain ones.

Names and labels follow go-grpc-prometheus so existing dashboards work; deploy/ queries these.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from recsys.core.domain import DegradedReason

# Latencies of a tens-of-milliseconds service, up to the default 2 s budget and beyond.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
GRPC_CODE_LABELS = (*GRPC_LABELS, "grpc_code")

SERVER_STARTED = Counter("grpc_server_started_total", "RPCs started on the server.", GRPC_LABELS)
SERVER_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by status code.", GRPC_CODE_LABELS
)
SERVER_HANDLING = Histogram(
    "grpc_server_handling_seconds",
    "Server-side RPC latency until the status is sent.",
    GRPC_CODE_LABELS,
    buckets=LATENCY_BUCKETS,
)
CLIENT_STARTED = Counter(
    "grpc_client_started_total", "RPCs started by this process as a client.", GRPC_LABELS
)
CLIENT_HANDLED = Counter(
    "grpc_client_handled_total", "Client RPCs completed, by status code.", GRPC_CODE_LABELS
)
CLIENT_HANDLING = Histogram(
    "grpc_client_handling_seconds",
    "Client-side RPC latency until the status is received.",
    GRPC_CODE_LABELS,
    buckets=LATENCY_BUCKETS,
)

BUNDLE_INFO = Gauge(
    "recsys_bundle_info",
    "The live bundle version (value 1; only the live version has a series).",
    ("service", "version"),
)
BUNDLE_LOADED = Gauge(
    "recsys_bundle_loaded_timestamp_seconds",
    "Unix time of the last successful bundle load (at start or a hot swap).",
    ("service",),
)
BUNDLE_LOAD_FAILURES = Counter(
    "recsys_bundle_load_failures_total",
    "Bundle versions CURRENT named that failed to load; the previous version kept serving.",
    ("service",),
)
SERVING = Gauge("recsys_serving", "1 while health is SERVING, else 0.", ("service",))

# Gateway
STAGE_DURATION = Histogram(
    "recsys_stage_duration_seconds",
    "Gateway time per pipeline stage.",
    ("stage",),
    buckets=LATENCY_BUCKETS,
)
CANDIDATES = Histogram(
    "recsys_candidates", "Items per request at each stage.", ("stage",), buckets=COUNT_BUCKETS
)
DEGRADED = Counter(
    "recsys_degraded_responses_total",
    "Degraded answers (without ranking, or without CF candidates), by reason.",
    ("reason",),
)

# Ranking
RANKING_BATCH_SIZE = Histogram(
    "recsys_ranking_batch_size",
    "(context, item) pairs per cross-encoder forward pass.",
    buckets=COUNT_BUCKETS,
)
RANKING_QUEUE_DEPTH = Gauge("recsys_ranking_queue_depth", "Pairs waiting for the cross-encoder.")
RANKING_INFERENCE = Histogram(
    "recsys_ranking_inference_seconds",
    "Cross-encoder time per batch.",
    buckets=LATENCY_BUCKETS,
)

# Retrieval
INDEX_ITEMS = Gauge("recsys_index_items", "Live items in the ANN index.")
CHANGE_LOG_APPLIED = Gauge(
    "recsys_change_log_applied_position",
    "Position of the last catalog change log record this replica's live version applied.",
)
CHANGE_LOG_HEAD = Gauge(
    "recsys_change_log_head_position",
    "Newest position this replica has seen committed in the catalog change log.",
)
CHANGE_LOG_ERRORS = Counter(
    "recsys_change_log_errors_total",
    "Failed reads of the catalog change log (this replica stops following it until one works).",
)
CORRUPT_RECORDS = Counter(
    "recsys_retrieval_corrupt_records_total",
    "Stored online changes found corrupt when read (a state dir journal record or snapshot, a "
    "change log row): the read fails with DATA_LOSS and the log names where; counted at each read.",
)

# Any server: writes let through by the write policy (recsys.rpc.auth). Identities come from
# the configured allow-list (or "anonymous" without one), so the label stays bounded.
WRITES = Counter(
    "recsys_writes_total", "Catalog writes accepted, by caller identity.", ("identity", "method")
)


_live_versions: dict[str, str] = {}


def set_bundle_version(service: str, version: str) -> None:
    """Marks `version` as the live one of `service`: its series is 1, the previous one is gone."""
    old = _live_versions.get(service)
    if old == version:
        return
    if old is not None:
        BUNDLE_INFO.remove(service, old)
    BUNDLE_INFO.labels(service=service, version=version).set(1)
    _live_versions[service] = version


def init_bundle_metrics(service: str) -> None:
    """Creates the load-failure series at 0, so an alert on its increase sees the first one."""
    BUNDLE_LOAD_FAILURES.labels(service=service)


def init_gateway_metrics() -> None:
    """Creates every degraded-reason series at 0 so rate() and alerts see them before any event."""
    for reason in DegradedReason:
        DEGRADED.labels(reason=reason.value)
    for stage in ("retrieval", "ranking", "diversity", "total"):
        STAGE_DURATION.labels(stage=stage)


def split_method(full_method: str) -> tuple[str, str]:
    """'/recsys.v1.RetrievalService/Search' → ('recsys.v1.RetrievalService', 'Search')."""
    _, service, method = full_method.split("/", 2)
    return service, method


def observe_rpc(
    started: Counter,
    handled: Counter,
    handling: Histogram,
    full_method: str,
) -> Callable[[str], None]:
    """Counts an RPC as started; the callback it returns records the end with its status name."""
    service, method = split_method(full_method)
    labels = {"grpc_type": "unary", "grpc_service": service, "grpc_method": method}
    started.labels(**labels).inc()
    start = time.perf_counter()

    def finish(name: str) -> None:
        handled.labels(**labels, grpc_code=name).inc()
        handling.labels(**labels, grpc_code=name).observe(time.perf_counter() - start)

    return finish
