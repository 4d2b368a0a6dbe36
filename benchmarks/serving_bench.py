"""Recommend latency and throughput over gRPC vs the same pipeline in-process (no gRPC).

Both sides run the same RecommendPipeline over the same bundle and request mix; the ratio of
the two is the cost of the service boundary (serialisation, sockets, three processes).
`python -m benchmarks.serving_bench [--bundle ROOT] [--out benchmarks/reports]`
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pandas as pd

from gateway.pipeline import RecommendPipeline
from gateway.servicer import validate
from ranking_service.ranker import Ranker
from recsys.app.local import LocalRankingStage, LocalRetrievalStage
from recsys.core.bundle import Bundle
from recsys.core.settings import Settings
from recsys.rpc.launcher import launched, on_free_ports
from recsys.v1 import gateway_pb2, gateway_pb2_grpc
from retrieval_service.retriever import Retriever

CONCURRENCY = (1, 8, 32)
DEADLINE_S = 60.0  # generous: measure queueing, not the degraded fallback


@dataclass(frozen=True)
class Stats:
    p50_ms: float
    p95_ms: float
    p99_ms: float
    throughput_rps: float
    requests: int
    degraded: int


def stats(latencies: list[float], wall: float, degraded: int) -> Stats:
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return Stats(
        q[49] * 1e3, q[94] * 1e3, q[98] * 1e3, len(latencies) / wall, len(latencies), degraded
    )


def request_mix(
    bundle: Bundle, n: int, k: int, pool: int, seed: int = 0
) -> list[gateway_pb2.RecommendRequest]:
    """Queries (item titles), user histories, and both, from the bundle's own catalog."""
    catalog = pd.read_parquet(bundle.file("catalog.parquet"))
    rng = random.Random(seed)
    ids = catalog["item_id"].tolist()
    titles = catalog["title"].tolist()
    out = []
    for i in range(n):
        history = rng.sample(ids, 5)
        kind = i % 3
        out.append(
            gateway_pb2.RecommendRequest(
                query=rng.choice(titles) if kind != 1 else "",
                history_item_ids=history if kind != 0 else [],
                k=k,
                candidate_pool=pool,
            )
        )
    return out


async def drive(call: Any, requests: list[Any], concurrency: int) -> Stats:
    """Sends the requests with `concurrency` in flight; returns latency percentiles and rate."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    latencies: list[float] = []
    degraded = 0

    async def worker() -> None:
        nonlocal degraded
        while not queue.empty():
            request = queue.get_nowait()
            t0 = time.perf_counter()
            answer = await call(request)
            latencies.append(time.perf_counter() - t0)
            degraded += int(answer.degraded)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return stats(latencies, time.perf_counter() - start, degraded)


async def in_process(root: Path, requests_for: dict[int, list[Any]]) -> dict[int, Stats]:
    settings = Settings.built_in(bundle=root, device="cpu")
    bundle = Bundle.open(root)
    retriever = await asyncio.to_thread(Retriever.load, bundle, None, "cpu")
    ranker = await asyncio.to_thread(Ranker.load, bundle, settings)
    ranker.start()
    pipeline = RecommendPipeline(
        LocalRetrievalStage(retriever), LocalRankingStage(ranker), settings
    )

    async def call(msg: Any) -> Any:
        return await pipeline.recommend(validate(msg, settings), DEADLINE_S)

    await drive(call, requests_for[1][:3], 1)  # warm-up
    results = {c: await drive(call, requests_for[c], c) for c in CONCURRENCY}
    await ranker.close()
    return results


async def over_grpc(root: Path, requests_for: dict[int, list[Any]]) -> dict[int, Stats]:
    settings = on_free_ports(
        Settings.built_in(
            bundle=root,
            device="cpu",
            state_dir=Path(tempfile.mkdtemp(prefix="bench-state-")),
            max_concurrent_rpcs=256,
        )
    )
    with launched(settings, log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-"))) as services:
        async with grpc.aio.insecure_channel(services.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def call(msg: Any) -> Any:
                return await stub.Recommend(msg, timeout=DEADLINE_S)

            await drive(call, requests_for[1][:3], 1)
            return {c: await drive(call, requests_for[c], c) for c in CONCURRENCY}


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Serving benchmark: Recommend over gRPC vs in-process",
        "",
        f"bundle `{report['bundle']}`, k={report['k']}, candidate_pool={report['pool']}, "
        f"device cpu, {report['cpus']} CPUs, {report['python']}",
        "",
        "| concurrency | side | p50 ms | p95 ms | p99 ms | req/s | degraded |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in map(str, CONCURRENCY):
        for side in ("in_process", "grpc"):
            s = report[side][c]
            lines.append(
                f"| {c} | {side} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | "
                f"{s['throughput_rps']:.2f} | {s['degraded']} |"
            )
        r = report["ratio_grpc_over_in_process"][c]
        lines.append(f"| {c} | **ratio** | {r['p50']:.2f}x | | | {r['throughput']:.2f}x | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, default=Path("artifacts/movielens"), help="bundle root"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/reports"))
    parser.add_argument(
        "--requests",
        type=int,
        default=24,
        help="requests per concurrency level (x2 at 8, x3 at 32)",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--pool", type=int, default=30, help="candidate_pool (CE cost grows with it)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = Bundle.open(args.bundle)
    sizes = {1: args.requests, 8: 2 * args.requests, 32: 3 * args.requests}
    requests_for = {c: request_mix(bundle, n, args.k, args.pool, seed=c) for c, n in sizes.items()}
    local = asyncio.run(in_process(args.bundle, requests_for))
    remote = asyncio.run(over_grpc(args.bundle, requests_for))
    report = {
        "bundle": bundle.version,
        "k": args.k,
        "pool": args.pool,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "in_process": {str(c): vars(s) for c, s in local.items()},
        "grpc": {str(c): vars(s) for c, s in remote.items()},
        "ratio_grpc_over_in_process": {
            str(c): {
                "p50": remote[c].p50_ms / local[c].p50_ms,
                "throughput": remote[c].throughput_rps / local[c].throughput_rps,
            }
            for c in CONCURRENCY
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / "serving.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
