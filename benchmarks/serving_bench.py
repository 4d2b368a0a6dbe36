"""Recommend latency and throughput over gRPC: the two-pass ranker against the single-pass one.

Every side is the three real services over the same bundle and request mix; only the ranking
settings differ. `two_pass` is the defaults (the bundle's validated plan: the cross-encoder
copy, rerank depth and request kinds it chose); `two_pass_all_kinds` also reranks the kinds
the bundle skips the cross-encoder for; `single_pass_fp32` is the ranker before it: the fp32
cross-encoder over every candidate of every request. Latency is measured with a generous
deadline (what ranking costs), degraded answers at the default budget in a second run.
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

from recsys.core.bundle import Bundle
from recsys.core.settings import Settings
from recsys.rpc.launcher import launched, on_free_ports
from recsys.v1 import gateway_pb2, gateway_pb2_grpc

CONCURRENCY = (1, 8, 32)
DEADLINE_S = 120.0  # generous: measure queueing, not the degraded fallback
BUDGET_CONCURRENCY = 8  # the default budget's run: how many answers degrade
BASELINE = "single_pass_fp32"
SIDES: dict[str, dict[str, Any]] = {
    "two_pass": {},
    # The cross-encoder on every kind at its fitted depth, even where the bundle found it does
    # not pay: its cost wherever it does.
    "two_pass_all_kinds": {"rerank_kinds": "all"},
    BASELINE: {"rerank_depth": 1000, "rerank_kinds": "all", "cross_encoder_copy": "fp32"},
}


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


async def side(
    root: Path, requests_for: dict[int, list[Any]], **ranking: Any
) -> tuple[dict[int, Stats], Stats]:
    """Latency at each concurrency (generous deadline), then the default budget at 8."""
    settings = on_free_ports(
        Settings.built_in(
            bundle=root,
            device="cpu",
            state_dir=Path(tempfile.mkdtemp(prefix="bench-state-")),
            max_concurrent_rpcs=256,
            **ranking,
        )
    )
    with launched(settings, log_dir=Path(tempfile.mkdtemp(prefix="bench-logs-"))) as services:
        async with grpc.aio.insecure_channel(services.address("gateway")) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            async def generous(msg: Any) -> Any:
                return await stub.Recommend(msg, timeout=DEADLINE_S)

            async def default_budget(msg: Any) -> Any:
                return await stub.Recommend(msg)

            await drive(generous, requests_for[1][:3], 1)
            latency = {c: await drive(generous, requests_for[c], c) for c in CONCURRENCY}
            budget = await drive(
                default_budget, requests_for[BUDGET_CONCURRENCY], BUDGET_CONCURRENCY
            )
            return latency, budget


def markdown(report: dict[str, Any]) -> str:
    pool = report["pool"] or "default"
    lines = [
        "# Serving benchmark: Recommend over gRPC, two-pass ranker vs single-pass fp32",
        "",
        f"bundle `{report['bundle']}`, k={report['k']}, candidate_pool={pool}, device cpu, "
        f"{report['cpus']} CPUs, Python {report['python']}; request mix: a third searches "
        "(an item title), a third histories (5 items), a third both.",
        "",
        f"Latency with a {DEADLINE_S:.0f} s deadline; degraded answers at the default budget "
        f"at concurrency {BUDGET_CONCURRENCY} in the last column.",
        "",
        "| concurrency | ranker | p50 ms | p95 ms | p99 ms | req/s | degraded |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in map(str, CONCURRENCY):
        for name in SIDES:
            s = report["sides"][name]["latency"][c]
            degraded = report["sides"][name]["default_budget"]["degraded"]
            shown = f"{degraded}/{report['sides'][name]['default_budget']['requests']}"
            lines.append(
                f"| {c} | {name} | {s['p50_ms']:.1f} | {s['p95_ms']:.1f} | {s['p99_ms']:.1f} | "
                f"{s['throughput_rps']:.2f} | {shown if c == str(BUDGET_CONCURRENCY) else ''} |"
            )
        for name, r in report["ratio_over_single_pass"][c].items():
            lines.append(
                f"| {c} | **{name} / {BASELINE}** | {r['p50']:.3f}x | | | "
                f"{r['throughput']:.1f}x | |"
            )
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
        "--name", default="serving", help="report file names: OUT/NAME.json and OUT/NAME.md"
    )
    parser.add_argument(
        "--requests",
        type=int,
        default=24,
        help="requests per concurrency level (x2 at 8, x3 at 32)",
    )
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument(
        "--pool", type=int, default=0, help="candidate_pool (default: the gateway's default)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bundle = Bundle.open(args.bundle)
    sizes = {1: args.requests, 8: 2 * args.requests, 32: 3 * args.requests}
    requests_for = {c: request_mix(bundle, n, args.k, args.pool, seed=c) for c, n in sizes.items()}
    sides = {
        name: asyncio.run(side(args.bundle, requests_for, **ranking))
        for name, ranking in SIDES.items()
    }
    old = sides[BASELINE][0]
    report = {
        "bundle": bundle.version,
        "k": args.k,
        "pool": args.pool,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "sides": {
            name: {
                "settings": SIDES[name],
                "latency": {str(c): vars(s) for c, s in latency.items()},
                "default_budget": vars(budget),
            }
            for name, (latency, budget) in sides.items()
        },
        "ratio_over_single_pass": {
            str(c): {
                name: {
                    "p50": latency[c].p50_ms / old[c].p50_ms,
                    "throughput": latency[c].throughput_rps / old[c].throughput_rps,
                }
                for name, (latency, _) in sides.items()
                if name != BASELINE
            }
            for c in CONCURRENCY
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (args.out / f"{args.name}.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
