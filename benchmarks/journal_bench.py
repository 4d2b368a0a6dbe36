"""Retrieval start-up with 10,000 online one-item upserts in its state dir against an empty one.

Sides, all over the same retrieval bundle: `empty` (the baseline), `journal` (10,000 one-item
upsert records with their vectors and no snapshot: the longest tail, as with
journal_compact_records above 10,000) and `snapshot` (the same changes compacted into
snapshot.npz, where the default threshold leaves them). Each side is measured twice,
interleaved with the others in one run: `recsys serve retrieval` from process start to health
SERVING (what a restart costs), and `Retriever.load` in this process (the bundle and the
changes without interpreter and import time, so the changes' share shows).
`python -m benchmarks.journal_bench [--data movielens|sample] [--bundle ROOT] [--changes 10000]
[--out benchmarks/reports]`
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks.build_bench import MOVIELENS_ZIP, environment, synthetic_texts
from recsys.core.bundle import Bundle
from recsys.core.domain import Item
from recsys.core.settings import Settings
from recsys.rpc.launcher import SERVING, check_health, child_env, on_free_ports
from retrieval_service.changes import encoder_identity
from retrieval_service.retriever import Retriever
from retrieval_service.state import OnlineState

REPO_ROOT = Path(__file__).resolve().parent.parent
BASELINE = "empty"
SIDES = (BASELINE, "journal", "snapshot")
GOAL_RATIO = 2.0  # start-up with the changes within 2x of an empty state dir
NO_COMPACTION = 10**9  # a threshold the measured starts never reach: they leave the state as is
POLL_S = 0.02  # health polling while a service starts
START_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class Side:
    """Start-up seconds of one state dir, both ways, and what the load applied."""

    name: str
    service_runs_seconds: list[float]
    service_median_seconds: float
    load_runs_seconds: list[float]
    load_median_seconds: float
    upserts: int
    stored_vectors: int
    encoded: int
    journal_records: int
    state_bytes: int


def retrieval_bundle(data: str, workdir: Path, device: str) -> tuple[str, Bundle]:
    """A retrieval-only bundle (catalog, embeddings, Flat index, encoder copy) of the data set."""
    from recsys.app.ingest import load_catalog
    from recsys.app.sample import sample_paths
    from recsys.core import bundle as bundle_files
    from recsys.core.bundle import publish, staged_version, write_manifest
    from recsys.core.encoder import default_encoder_dir
    from retrieval_service.build import build_retrieval
    from retrieval_service.catalog import save_catalog

    if data == "movielens" and MOVIELENS_ZIP.is_file():
        from recsys.app.movielens import read_movielens

        name = f"MovieLens ml-latest-small ({MOVIELENS_ZIP.name})"
        catalog = read_movielens(MOVIELENS_ZIP).catalog
    else:
        path, _ = sample_paths()
        name, catalog = f"sample catalog ({path.name})", load_catalog(path)
    root = workdir / "bundle"
    with staged_version(root, "bench") as stage:
        save_catalog(catalog, stage / bundle_files.CATALOG)
        built = build_retrieval(catalog, stage, default_encoder_dir(), device=device)
        write_manifest(stage, {"version": "bench", **built.manifest})
    publish(root, "bench")
    return name, Bundle.open(root)


def write_states(bundle: Bundle, workdir: Path, changes: int, device: str) -> dict[str, Any]:
    """Every side's state dir; the journal is written through the real, fsynced append."""
    retriever = Retriever.load(bundle, None, device=device)
    items = [Item(f"bench-{n:05d}", text) for n, text in enumerate(synthetic_texts(changes, 7))]
    started = time.perf_counter()
    vectors = retriever.encoder.encode([item.text() for item in items])
    encode_seconds = time.perf_counter() - started

    (workdir / "empty").mkdir()
    state = OnlineState(workdir / "journal", encoder_identity(bundle.manifest), NO_COMPACTION)
    state.load()
    started = time.perf_counter()
    for n, item in enumerate(items):
        state.append_upsert([item], vectors[n : n + 1])
    append_seconds = time.perf_counter() - started
    state.close()

    shutil.copytree(workdir / "journal", workdir / "snapshot")
    Retriever.load(bundle, workdir / "snapshot", device=device, compact_records=1).close()
    return {
        "encode_items_per_second": round(changes / encode_seconds, 1),
        "append_ms_per_upsert": round(1000 * append_seconds / changes, 3),
    }


def service_start(bundle: Bundle, state_dir: Path, device: str, log: Path) -> float:
    """Seconds from spawning `recsys serve retrieval` to its health check answering SERVING."""
    settings = on_free_ports(
        Settings.built_in(
            bundle=bundle.root,
            state_dir=state_dir,
            device=device,
            journal_compact_records=NO_COMPACTION,
            grace_period_s=0,
        )
    )
    address = f"127.0.0.1:{settings.retrieval_port}"
    with log.open("ab") as output:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys", "serve", "retrieval"],
            env=child_env(settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    try:
        while time.perf_counter() - started < START_TIMEOUT_S:
            if proc.poll() is not None:
                raise RuntimeError(f"retrieval exited with {proc.returncode}; see {log}")
            try:
                if check_health(address, timeout=1.0) == SERVING:
                    return time.perf_counter() - started
            except grpc.RpcError:
                pass
            time.sleep(POLL_S)
        raise TimeoutError(f"retrieval not SERVING after {START_TIMEOUT_S:.0f} s; see {log}")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def measure(bundle: Bundle, workdir: Path, repeats: int, device: str) -> list[Side]:
    """Interleaved start-ups, one of each side and kind per round, after a warm-up round."""
    service: dict[str, list[float]] = {name: [] for name in SIDES}
    load: dict[str, list[float]] = {name: [] for name in SIDES}
    last: dict[str, Retriever] = {}
    for round_number in range(repeats + 1):
        for name in SIDES:
            seconds = service_start(bundle, workdir / name, device, workdir / f"{name}.log")
            started = time.perf_counter()
            retriever = Retriever.load(
                bundle, workdir / name, device=device, compact_records=NO_COMPACTION
            )
            loaded = time.perf_counter() - started
            retriever.close()
            last[name] = retriever
            if round_number:  # the first round warms the page cache
                service[name].append(seconds)
                load[name].append(loaded)
            print(f"{name}: service {seconds:.2f} s, load {loaded:.3f} s", flush=True)
    return [
        Side(
            name=name,
            service_runs_seconds=[round(s, 3) for s in service[name]],
            service_median_seconds=round(statistics.median(service[name]), 3),
            load_runs_seconds=[round(s, 3) for s in load[name]],
            load_median_seconds=round(statistics.median(load[name]), 3),
            upserts=last[name].replayed.upserts,
            stored_vectors=last[name].replayed.stored_vectors,
            encoded=last[name].replayed.encoded,
            journal_records=last[name].replayed.journal_records,
            state_bytes=sum(
                p.stat().st_size for p in (workdir / name).iterdir() if p.name != "LOCK"
            ),
        )
        for name in SIDES
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table."""
    env = report["environment"]
    lines = [
        "# Retrieval start-up with online changes",
        "",
        f"Bundle: {report['data']}, retrieval only ({report['catalog_items']:,} items, Flat "
        f"index). {report['changes']:,} one-item upserts of synthetic product texts. Device: "
        f"{env['device']}, {env['cpus_available']} CPUs, torch threads {env['torch_threads']}. "
        f"Medians of {report['repeats']} interleaved runs per side after a warm-up round.",
        "",
        "| state dir | service start s | × empty | in-process load s | × empty "
        "| stored vectors | re-encoded | journal records | state MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["sides"]:
        ratios = report["ratios"][row["name"]]
        lines.append(
            f"| {row['name']} | {row['service_median_seconds']:.2f} | {ratios['service']:.2f} | "
            f"{row['load_median_seconds']:.3f} | {ratios['load']:.2f} | "
            f"{row['stored_vectors']:,} | {row['encoded']:,} | {row['journal_records']:,} | "
            f"{row['state_bytes'] / 2**20:.1f} |"
        )
    setup, journal = report["setup"], report["ratios"]["journal"]
    lines += [
        "",
        f"Goal: `journal` service start within {GOAL_RATIO:.0f}× of `empty`: "
        f"{'met' if report['goal_met'] else 'NOT met'} ({journal['service']:.2f}×; the "
        f"in-process load alone, without interpreter and imports, {journal['load']:.2f}×).",
        "",
        f"Appending the journal through the fsynced write path took "
        f"{setup['append_ms_per_upsert']:.2f} ms per upsert. Changes without a usable vector "
        f"(an old-format journal, or another encoder) are re-encoded in one batched pass at "
        f"{setup['encode_items_per_second']:.0f} items/s here, once: the start that does it "
        "compacts them into the snapshot. Before vectors were journaled, replay encoded each "
        "record on its own (a restart with about 280 upserts took about 48 s).",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", choices=["movielens", "sample"], default="movielens")
    parser.add_argument("--bundle", type=Path, help="an existing bundle root instead of --data")
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "reports")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # A benchmark must never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(tempfile.mkdtemp(prefix="journal-bench-"))
    try:
        if args.bundle:
            data, bundle = str(args.bundle), Bundle.open(args.bundle)
        else:
            data, bundle = retrieval_bundle(args.data, workdir, args.device)
        print(f"{data}; writing {args.changes:,} upserts ...", flush=True)
        setup = write_states(bundle, workdir, args.changes, args.device)
        sides = measure(bundle, workdir, args.repeats, args.device)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    base = next(side for side in sides if side.name == BASELINE)
    ratios = {
        side.name: {
            "service": round(side.service_median_seconds / base.service_median_seconds, 3),
            "load": round(side.load_median_seconds / base.load_median_seconds, 3),
        }
        for side in sides
    }
    report = {
        "data": data,
        "catalog_items": int(bundle.manifest["index"]["size"]),
        "changes": args.changes,
        "repeats": args.repeats,
        "environment": environment(args.device),
        "setup": setup,
        "sides": [asdict(side) for side in sides],
        "ratios": ratios,
        "goal_met": ratios["journal"]["service"] <= GOAL_RATIO,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "journal.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "journal.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
