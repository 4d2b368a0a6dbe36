"""Offline build benchmark: encoding speed against sentence-transformers, and FAISS index types.

Run: python -m benchmarks.build_bench [--data movielens|sample] [--out benchmarks/reports]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recsys.core.domain import item_text

REPO_ROOT = Path(__file__).resolve().parent.parent
MOVIELENS_ZIP = REPO_ROOT.parent / "shared" / "data" / "ml-latest-small.zip"
SAMPLE_CATALOG = REPO_ROOT / "recsys" / "sample_data" / "catalog.csv"
FACTORIES = ["Flat", "IVF64,Flat", "IVF256,Flat", "HNSW32", "IVF64,PQ16"]
SEARCH_K = 10
LATENCY_QUERIES = 200


@dataclass(frozen=True)
class EncodeResult:
    """Items per second of one encoder over the same texts, batch size and device."""

    name: str
    runs_seconds: list[float]
    best_items_per_second: float
    median_items_per_second: float


@dataclass(frozen=True)
class IndexResult:
    """Build cost, search speed and self-retrieval quality of one FAISS factory string."""

    factory: str
    device: str
    build_seconds: float
    train_seconds: float
    add_seconds: float
    size_bytes: int
    batch_queries_per_second: float
    single_query_p50_ms: float
    self_recall_at_1: float
    self_recall_at_10: float


def load_texts(data: str) -> tuple[str, list[str]]:
    """Item texts of the chosen data set, falling back to the next one that exists."""
    if data == "movielens" and MOVIELENS_ZIP.is_file():
        return f"MovieLens ml-latest-small ({MOVIELENS_ZIP.name})", movielens_texts(MOVIELENS_ZIP)
    if SAMPLE_CATALOG.is_file():
        from retrieval_service.build import catalog_texts

        return f"sample catalog ({SAMPLE_CATALOG.name})", catalog_texts(pd.read_csv(SAMPLE_CATALOG))
    return "synthetic texts (no MovieLens zip or sample catalog found)", synthetic_texts(5000)


def movielens_texts(zip_path: Path) -> list[str]:
    """Movie texts as the bundle build sees them: the shared reader when present, else movies.csv."""
    try:
        from recsys.app.movielens import read_movielens
        from retrieval_service.build import catalog_texts

        return catalog_texts(read_movielens(zip_path).catalog)
    except ImportError:
        pass
    with zipfile.ZipFile(zip_path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("/movies.csv"))
        with archive.open(name) as fh:
            movies = pd.read_csv(fh)
    genres = movies["genres"].fillna("").str.replace("(no genres listed)", "", regex=False)
    return [
        item_text(title, genre.replace("|", ", "))
        for title, genre in zip(movies["title"].astype(str), genres, strict=True)
    ]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
    """Product-like texts of varied length, for when no real catalog is at hand."""
    rng = np.random.default_rng(seed)
    words = [
        "red",
        "blue",
        "light",
        "heavy",
        "cotton",
        "steel",
        "wooden",
        "smart",
        "compact",
        "travel",
        "kitchen",
        "garden",
    ]
    nouns = [
        "lamp",
        "chair",
        "jacket",
        "kettle",
        "speaker",
        "backpack",
        "bottle",
        "knife",
        "shoe",
        "tent",
        "mug",
        "desk",
    ]
    return [
        item_text(
            f"{rng.choice(words)} {rng.choice(nouns)} {i}",
            str(rng.choice(nouns)),
            " ".join(rng.choice(words, size=int(rng.integers(0, 40)))),
        )
        for i in range(n)
    ]


def time_runs(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of each of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return seconds


def bench_encoding(
    texts: list[str], device: str, batch_size: int, repeats: int
) -> tuple[list[EncodeResult], np.ndarray, float]:
    """Ours vs SentenceTransformer.encode on identical inputs; returns results, our vectors and
    the largest absolute difference between the two encoders' vectors."""
    from sentence_transformers import SentenceTransformer

    from recsys.core.devices import resolve_device
    from recsys.core.encoder import TextEncoder, default_encoder_dir

    resolved = resolve_device(device)
    ours = TextEncoder.load(default_encoder_dir(), pooling="mean", device=resolved)
    baseline = SentenceTransformer(str(default_encoder_dir()), device=resolved)
    if resolved == "cuda":
        baseline.half()  # same precision as ours on GPU, so the comparison is like for like

    def run_ours() -> np.ndarray:
        return ours.encode(texts, batch_size=batch_size)

    def run_baseline() -> np.ndarray:
        return np.asarray(
            baseline.encode(texts, batch_size=batch_size, normalize_embeddings=True),
            dtype=np.float32,
        )

    warm = texts[: 4 * batch_size]
    ours.encode(warm, batch_size=batch_size)
    baseline.encode(warm, batch_size=batch_size)
    # Interleave the two so drift (thermal, other load) affects both alike.
    ours_runs: list[float] = []
    baseline_runs: list[float] = []
    for _ in range(repeats):
        ours_runs += time_runs(run_ours, 1)
        baseline_runs += time_runs(run_baseline, 1)
    vectors = run_ours()
    difference = float(np.abs(vectors - run_baseline()).max())
    results = [
        _encode_result("recsys TextEncoder", len(texts), ours_runs),
        _encode_result("sentence-transformers", len(texts), baseline_runs),
    ]
    return results, vectors, difference


def _encode_result(name: str, n: int, runs: list[float]) -> EncodeResult:
    return EncodeResult(
        name=name,
        runs_seconds=[round(s, 3) for s in runs],
        best_items_per_second=round(n / min(runs), 1),
        median_items_per_second=round(n / statistics.median(runs), 1),
    )


def bench_index(vectors: np.ndarray, factory: str, device: str) -> IndexResult:
    """Builds one index over all vectors and measures search and self-retrieval on it."""
    from retrieval_service.index import VectorIndex

    started = time.perf_counter()
    index = VectorIndex.build(vectors, factory=factory, device=device)
    build_seconds = time.perf_counter() - started

    started = time.perf_counter()
    _, rows = index.search(vectors, SEARCH_K)
    batch_seconds = time.perf_counter() - started

    latencies = []
    for i in range(min(LATENCY_QUERIES, len(vectors))):
        started = time.perf_counter()
        index.search(vectors[i : i + 1], SEARCH_K)
        latencies.append(time.perf_counter() - started)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "index.faiss"
        index.save(path)
        size = path.stat().st_size
    return IndexResult(
        factory=factory,
        device=index.device,
        build_seconds=round(build_seconds, 3),
        train_seconds=round(index.build_timings["train_seconds"], 3),
        add_seconds=round(index.build_timings["add_seconds"], 3),
        size_bytes=size,
        batch_queries_per_second=round(len(vectors) / batch_seconds, 1),
        single_query_p50_ms=round(1000 * statistics.median(latencies), 3),
        self_recall_at_1=round(self_recall(vectors, rows[:, :1]), 4),
        self_recall_at_10=round(self_recall(vectors, rows), 4),
    )


def self_recall(vectors: np.ndarray, rows: np.ndarray) -> float:
    """Share of items whose own vector is among the returned rows; an identical vector (duplicate
    text) counts as found, since no index can tell the two apart."""
    hits = 0
    for i, found in enumerate(rows):
        found = found[found >= 0]
        if i in found or (len(found) and float((vectors[found] @ vectors[i]).max()) >= 1 - 1e-6):
            hits += 1
    return hits / len(rows)


def environment(device: str) -> dict[str, Any]:
    """Where the numbers came from."""
    import faiss
    import torch

    from recsys.app.build import package_versions
    from recsys.core.devices import resolve_device

    versions = package_versions(
        ("torch", "transformers", "sentence-transformers", "faiss-cpu", "faiss-gpu-cu12")
    )
    resolved = resolve_device(device)
    return {
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus_available": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "device": resolved,
        "gpu": torch.cuda.get_device_name(0) if resolved == "cuda" else None,
        "faiss_gpus": faiss.get_num_gpus(),
        "versions": versions,
    }


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    env = report["environment"]
    lines = [
        "# Build benchmark",
        "",
        f"Data: {report['data']}, {report['items']} items. Device: {env['device']}"
        + (f" ({env['gpu']})" if env["gpu"] else "")
        + f", {env['cpus_available']} CPUs, torch threads {env['torch_threads']}.",
        "",
        f"## Encoding (all-MiniLM-L6-v2, batch size {report['batch_size']}, "
        f"{report['repeats']} runs after warm-up)",
        "",
        "| encoder | best items/s | median items/s | runs (s) |",
        "|---|---:|---:|---|",
    ]
    for row in report["encoding"]:
        runs = ", ".join(f"{s:.2f}" for s in row["runs_seconds"])
        lines.append(
            f"| {row['name']} | {row['best_items_per_second']:.1f} | "
            f"{row['median_items_per_second']:.1f} | {runs} |"
        )
    lines += [
        "",
        f"Ratio ours/baseline: {report['encoding_ratio_best']:.2f}x (best), "
        f"{report['encoding_ratio_median']:.2f}x (median). "
        f"Largest absolute difference between the two encoders' vectors: "
        f"{report['max_abs_difference']:.2e}.",
        "",
        f"## FAISS index types (inner product, k={SEARCH_K}, every item queries its own vector)",
        "",
        "| factory | device | build s | train s | add s | size MiB | batch q/s | "
        "1-query p50 ms | self-recall@1 | self-recall@10 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["indexes"]:
        lines.append(
            f"| {row['factory']} | {row['device']} | {row['build_seconds']:.3f} | "
            f"{row['train_seconds']:.3f} | {row['add_seconds']:.3f} | "
            f"{row['size_bytes'] / 2**20:.2f} | {row['batch_queries_per_second']:.0f} | "
            f"{row['single_query_p50_ms']:.3f} | {row['self_recall_at_1']:.4f} | "
            f"{row['self_recall_at_10']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", choices=["movielens", "sample"], default="movielens")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "reports")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=None, help="Use only the first N items.")
    parser.add_argument("--factories", nargs="+", default=FACTORIES)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    # A benchmark must never reach for a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data, texts = load_texts(args.data)
    texts = texts[: args.limit] if args.limit else texts
    print(f"{data}: {len(texts)} items", flush=True)

    encoding, vectors, difference = bench_encoding(
        texts, args.device, args.batch_size, args.repeats
    )
    ours, baseline = encoding
    indexes = []
    for factory in args.factories:
        print(f"index {factory} ...", flush=True)
        indexes.append(bench_index(vectors, factory, args.device))

    report = {
        "data": data,
        "items": len(texts),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "environment": environment(args.device),
        "encoding": [asdict(r) for r in encoding],
        "encoding_ratio_best": round(
            ours.best_items_per_second / baseline.best_items_per_second, 3
        ),
        "encoding_ratio_median": round(
            ours.median_items_per_second / baseline.median_items_per_second, 3
        ),
        "max_abs_difference": difference,
        "indexes": [asdict(r) for r in indexes],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "build.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "build.md").write_text(markdown)
    print(markdown)
    return report


if __name__ == "__main__":
    main()
