"""What the shared change log costs a write and how fast a write reaches every replica.

Sides, over one retrieval bundle, each a real `recsys serve retrieval` process answering
one-item UpsertItems over gRPC, measured in one run:
- `journal` (the baseline): one replica on the local journal (fsync per write);
- `change_log`: one replica on the PostgreSQL change log (commit per write, then catch-up);
- `change_log_3`: three replicas on one log, writes sent round-robin; besides the write's own
  latency, the time until the other two replicas hold it (GetItems polled every 2 ms).
PostgreSQL is Debian's, started here with its durable defaults (fsync, synchronous_commit on).
`python -m benchmarks.replication_bench [--data movielens|sample] [--writes 300]
[--out benchmarks/reports]`
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import pandas as pd

from benchmarks.build_bench import environment
from benchmarks.journal_bench import retrieval_bundle
from recsys.core import bundle as bundle_files
from recsys.core.settings import Settings
from recsys.rpc.launcher import Launcher, on_free_ports
from recsys.v1 import common_pb2, retrieval_pb2
from recsys.v1.retrieval_pb2_grpc import RetrievalServiceStub as Stub
from tests.postgres import PostgresServer, binaries

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = "journal"
POLL_S = 0.002
VISIBLE_TIMEOUT_S = 30.0


def percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)
    return {
        "p50_ms": 1000 * statistics.median(ordered),
        "p95_ms": 1000 * ordered[int(0.95 * (len(ordered) - 1))],
        "max_ms": 1000 * ordered[-1],
    }


def start_replicas(bundle_root: Path, workdir: Path, count: int, **settings: Any) -> list[Launcher]:
    launchers = []
    for n in range(count):
        own = workdir / f"replica-{n}"
        base = Settings.built_in(bundle=bundle_root, state_dir=own / "state", device="cpu")
        launcher = Launcher(
            on_free_ports(base).model_copy(update={"bundle_poll_s": 0, **settings}),
            log_dir=own,
            env={"OMP_NUM_THREADS": "1"},
        )
        launcher.start("retrieval", wait=False)
        launchers.append(launcher)
    for launcher in launchers:
        launcher.wait_serving("retrieval", timeout=600)
    return launchers


def write(stub: Stub, item_id: str) -> float:
    item = common_pb2.Item(item_id=item_id, title=f"Benchmark gadget {item_id}", category="Bench")
    started = time.perf_counter()
    stub.UpsertItems(retrieval_pb2.UpsertItemsRequest(items=[item]), timeout=60)
    return time.perf_counter() - started


def visible_after(stubs: list[Stub], item_id: str, started: float) -> float:
    pending = list(stubs)
    while pending:
        reply_missing = [
            s
            for s in pending
            if s.GetItems(
                retrieval_pb2.GetItemsRequest(item_ids=[item_id]), timeout=30
            ).missing_item_ids
        ]
        pending = reply_missing
        if pending:
            if time.perf_counter() - started > VISIBLE_TIMEOUT_S:
                raise TimeoutError(f"{item_id} not on every replica after {VISIBLE_TIMEOUT_S}s")
            time.sleep(POLL_S)
    return time.perf_counter() - started


def measure_side(name: str, launchers: list[Launcher], writes: int) -> dict[str, Any]:
    channels = [grpc.insecure_channel(x.address("retrieval")) for x in launchers]
    stubs = [Stub(c) for c in channels]
    for n in range(10):  # warm-up: connections, the encoder's first calls
        write(stubs[n % len(stubs)], f"{name}-warm-{n}")
    latencies, visible = [], []
    for n in range(writes):
        target = n % len(stubs)
        item_id = f"{name}-{n}"
        started = time.perf_counter()
        latencies.append(write(stubs[target], item_id))
        others = [s for i, s in enumerate(stubs) if i != target]
        if others:
            visible.append(visible_after(others, item_id, started))
    for channel in channels:
        channel.close()
    row: dict[str, Any] = {"name": name, "replicas": len(stubs), "write": percentiles(latencies)}
    if visible:
        row["visible_everywhere"] = percentiles(visible)
    return row


def run(data: str, writes: int) -> dict[str, Any]:
    bin_dir = binaries()
    if bin_dir is None:
        raise SystemExit("PostgreSQL not found: apt-get install postgresql")
    with tempfile.TemporaryDirectory(prefix="replication-bench-") as tmp:
        workdir = Path(tmp)
        data_name, bundle = retrieval_bundle(data, workdir, "cpu")
        items = len(pd.read_parquet(bundle.file(bundle_files.CATALOG)))
        server = PostgresServer(bin_dir)
        server.start()
        try:
            sides = []
            plans = [
                (BASELINE, 1, {}),
                ("change_log", 1, {"change_log_url": server.create_database("one")}),
                ("change_log_3", 3, {"change_log_url": server.create_database("three")}),
            ]
            for name, count, settings in plans:
                launchers = start_replicas(bundle.path.parent, workdir / name, count, **settings)
                try:
                    sides.append(measure_side(name, launchers, writes))
                finally:
                    for launcher in launchers:
                        launcher.close()
        finally:
            server.remove()
    base = sides[0]["write"]["p50_ms"]
    return {
        "data": data_name,
        "catalog_items": items,
        "writes": writes,
        "sides": sides,
        "ratios": {s["name"]: s["write"]["p50_ms"] / base for s in sides},
        "environment": environment("cpu"),
    }


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Catalog writes: local journal vs the shared change log",
        "",
        f"Bundle: {report['data']}, retrieval only ({report['catalog_items']:,} items). "
        f"{report['writes']} one-item UpsertItems "
        f"per side over gRPC, after 10 warm-up writes; {env['cpus_available']} CPUs, every "
        "process on this machine (PostgreSQL included). Visible everywhere: from sending the "
        "write until the other replicas' GetItems hold it.",
        "",
        "| side | replicas | write p50 ms | p95 | max | × journal (p50) "
        "| visible everywhere p50 ms | p95 | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["sides"]:
        w, v = row["write"], row.get("visible_everywhere")
        seen = f"{v['p50_ms']:.1f} | {v['p95_ms']:.1f} | {v['max_ms']:.1f}" if v else "— | — | —"
        lines.append(
            f"| {row['name']} | {row['replicas']} | {w['p50_ms']:.1f} | {w['p95_ms']:.1f} | "
            f"{w['max_ms']:.1f} | {report['ratios'][row['name']]:.2f} | {seen} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", choices=["movielens", "sample"], default="movielens")
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "reports")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args.data, args.writes)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "replication.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "replication.md").write_text(render_markdown(report))
    print(render_markdown(report))


if __name__ == "__main__":
    main()
