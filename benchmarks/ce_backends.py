"""Cross-encoder inference backends on CPU: PyTorch fp32 vs ONNX Runtime and OpenVINO (fp32, int8),
and, with `--bundle ROOT`, sentence-transformers' `CrossEncoder.predict` (the baseline every
ratio is against) beside the copies a bundle serves (int8, student, student int8).

Every backend scores the same MovieLens-like (context, item) pairs through the same tokenizer
and token batches (`ranking_service.cross_encoder.encode_batches`), with the same thread count.
Speed: pairs/s per batch size, best of interleaved rounds. Agreement with PyTorch fp32: largest
and mean absolute logit difference, Spearman's rho and top-10 overlap per candidate list.
A second table times the token budget (`max_batch_tokens`) for PyTorch and the shipped int8 model.

`python -m benchmarks.ce_backends --model DIR --catalog CSV [--bundle ROOT] [--threads 2] [--out DIR]`
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from scipy.stats import spearmanr

from ranking_service.cross_encoder import (
    DEFAULT_MAX_LENGTH,
    CrossEncoderScorer,
    build_context,
    encode_batches,
)
from recsys.core.domain import item_text

Pair = tuple[str, str]
Arrays = dict[str, np.ndarray]
NO_BUDGET = 1 << 30


class Scorer(Protocol):
    def score(
        self, pairs: Sequence[Pair], batch_size: int = ..., max_batch_tokens: int = ...
    ) -> np.ndarray: ...


class ArrayScorer:
    """Any `arrays → logits` function behind the scorers' tokenization and batching."""

    def __init__(self, tokenizer: Any, max_length: int, run: Callable[[Arrays], np.ndarray]):
        self.tokenizer, self.max_length, self.run = tokenizer, max_length, run
        self._lock = threading.Lock()

    def score(
        self, pairs: Sequence[Pair], batch_size: int = 64, max_batch_tokens: int = NO_BUDGET
    ) -> np.ndarray:
        out = np.empty(len(pairs), np.float32)
        for idx, arrays in encode_batches(
            self.tokenizer, self._lock, pairs, self.max_length, batch_size, max_batch_tokens
        ):
            out[idx] = np.asarray(self.run(arrays), np.float32).reshape(-1)
        return out


class PredictScorer:
    """sentence-transformers' `CrossEncoder.predict` (raw logits), the library baseline."""

    def __init__(self, model_dir: Path, max_length: int) -> None:
        from sentence_transformers.cross_encoder import CrossEncoder

        self.model = CrossEncoder(
            str(model_dir), device="cpu", max_length=max_length, local_files_only=True
        )

    def score(
        self, pairs: Sequence[Pair], batch_size: int = 64, max_batch_tokens: int = NO_BUDGET
    ) -> np.ndarray:
        scores = self.model.predict(
            list(pairs),
            batch_size=batch_size,
            activation_fn=torch.nn.Identity(),
            show_progress_bar=False,
        )
        return np.asarray(scores, np.float32)


def bundle_copies(root: Path, max_length: int, threads: int) -> dict[str, Scorer]:
    """The cheaper copies a bundle's build made of its cross-encoder, as serving loads them."""
    from ranking_service.copies import DIRS, load_copy
    from recsys.core.bundle import Bundle

    bundle = Bundle.open(root)
    section = bundle.manifest.get("cross_encoder") or {}
    return {
        f"bundle {name}" + (" (serving)" if section.get("serving_copy") == name else ""): load_copy(
            name, bundle.path, max_length, "cpu", threads
        )
        for name in ("int8", "student", "student_int8")
        if name in section and (bundle.path / DIRS[name]).is_dir()
    }


def candidate_lists(
    catalog: pd.DataFrame, lists: int, candidates: int, history: int, seed: int
) -> list[list[Pair]]:
    """Lists of (context of `history` random titles, candidate item) pairs, as served."""
    texts = [
        item_text(str(r.title), str(r.category), str(r.description))
        for r in catalog.itertuples(index=False)
    ]
    rng = random.Random(seed)
    out = []
    for _ in range(lists):
        context = build_context("", rng.sample(texts, history), max_history=history)
        out.append([(context, t) for t in rng.sample(texts, candidates)])
    return out


def agreement(got: np.ndarray, ref: np.ndarray, lists: int) -> dict[str, float]:
    rhos, overlaps = [], []
    for g, r in zip(np.split(got, lists), np.split(ref, lists), strict=True):
        rhos.append(float(spearmanr(g, r)[0]))
        overlaps.append(len(set(np.argsort(-g)[:10]) & set(np.argsort(-r)[:10])) / 10)
    return {
        "max_abs_diff": float(np.abs(got - ref).max()),
        "mean_abs_diff": float(np.abs(got - ref).mean()),
        "spearman_mean": float(np.mean(rhos)),
        "spearman_min": float(np.min(rhos)),
        "top10_overlap": float(np.mean(overlaps)),
    }


def onnx_backends(
    source: CrossEncoderScorer, work: Path, threads: int
) -> dict[str, Callable[[Arrays], np.ndarray]]:
    """ONNX Runtime: fp32, dynamic int8 (per-channel), and dynamic int8 sparing the FFN outputs."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ranking_service.quantized import _Logits

    lock = threading.Lock()
    example_pairs = [("a context", "an item"), ("a longer context than that", "an item text")]
    _, example = next(encode_batches(source.tokenizer, lock, example_pairs, 128, 2, NO_BUDGET))
    names = list(example)
    fp32 = work / "model.onnx"
    torch.onnx.export(
        _Logits(source.model).eval(),
        tuple(torch.from_numpy(example[n]) for n in names),
        str(fp32),
        dynamo=False,
        input_names=names,
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={n: {0: "batch", 1: "seq"} for n in names} | {"logits": {0: "batch"}},
    )
    matmuls = [n.name for n in onnx.load(str(fp32)).graph.node if n.op_type in ("MatMul", "Gemm")]
    ffn_out = [n for n in matmuls if n.endswith("output/dense/MatMul") and "attention" not in n]
    files = {"ort-fp32": fp32}
    for name, exclude in (("ort-int8-dynamic", []), ("ort-int8-dynamic-fp32-ffn-out", ffn_out)):
        files[name] = work / f"{name}.onnx"
        quantize_dynamic(
            fp32,
            files[name],
            weight_type=QuantType.QInt8,
            per_channel=True,
            nodes_to_exclude=exclude,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    out: dict[str, Callable[[Arrays], np.ndarray]] = {}
    for name, path in files.items():
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def run(arrays: Arrays, session: Any = session) -> np.ndarray:
            return session.run(None, arrays)[0]

        out[name] = run
    return out


def openvino_fp32(source: CrossEncoderScorer, threads: int) -> Callable[[Arrays], np.ndarray]:
    """OpenVINO without quantization (fp32 inference), to separate runtime from int8 gains."""
    import openvino as ov

    from ranking_service.quantized import _Logits

    lock = threading.Lock()
    example_pairs = [("a context", "an item"), ("a longer context than that", "an item text")]
    _, example = next(encode_batches(source.tokenizer, lock, example_pairs, 128, 2, NO_BUDGET))
    model = ov.convert_model(
        _Logits(source.model).eval(),
        example_input={k: torch.from_numpy(v) for k, v in example.items()},
    )
    compiled = ov.Core().compile_model(
        model,
        "CPU",
        {
            "INFERENCE_NUM_THREADS": threads,
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32",
        },
    )
    request = compiled.create_infer_request()
    return lambda arrays: np.array(request.infer(arrays)[0])


def time_backend(
    scorer: Scorer, lists: list[list[Pair]], batch_size: int, max_batch_tokens: int
) -> float:
    started = time.perf_counter()
    for pairs in lists:
        scorer.score(pairs, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    return time.perf_counter() - started


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def markdown(report: dict[str, Any]) -> str:
    sizes = report["batch_sizes"]
    lines = [
        f"Threads: {report['threads']}; CPU: {report['cpu']}; pairs: {report['lists']} lists × "
        f"{report['candidates']} candidates; token lengths p50 {report['token_length_p50']:.0f}, "
        f"max {report['token_length_max']}; best of {report['rounds']} interleaved rounds.",
        "",
        "| backend | "
        + " | ".join(f"pairs/s @{b}" for b in sizes)
        + " | max abs Δ | mean abs Δ | Spearman mean (min) | top-10 overlap | x predict |",
        "|---|" + "---:|" * len(sizes) + "---:|---:|---:|---:|---:|",
    ]
    for name, row in report["backends"].items():
        a = row["agreement"]
        speedup = row.get("speedup_vs_predict", {})
        shown = " / ".join(f"{speedup[str(b)]:.1f}x" for b in sizes) if speedup else ""
        lines.append(
            f"| {name} | "
            + " | ".join(f"{row['pairs_per_s'][str(b)]:.0f}" for b in sizes)
            + f" | {a['max_abs_diff']:.4f} | {a['mean_abs_diff']:.4f} | "
            f"{a['spearman_mean']:.4f} ({a['spearman_min']:.4f}) | {a['top10_overlap']:.2f} | "
            f"{shown} |"
        )
    if report["budgets"]:
        budgets = list(next(iter(report["budgets"].values())))
        lines += [
            "",
            f"Token budget (max_batch_tokens), batch_size {report['budget_batch_size']}, "
            f"{report['budget_lists']} lists' pairs shuffled into one call: pairs/s",
            "",
            "| backend | " + " | ".join(budgets) + " |",
            "|---|" + "---:|" * len(budgets),
        ]
        for name, row in report["budgets"].items():
            lines.append(f"| {name} | " + " | ".join(f"{row[b]:.0f}" for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="fine-tuned cross-encoder dir")
    parser.add_argument("--catalog", type=Path, required=True, help="CSV: title,category,...")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH)
    parser.add_argument("--lists", type=int, default=10, help="candidate lists for agreement")
    parser.add_argument("--timed-lists", type=int, default=1, help="lists timed per trial")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--history", type=int, default=5)
    parser.add_argument("--batch-sizes", default="20,50,100")
    parser.add_argument("--budgets", default="1024,2048,4096,8192,0", help="0: no budget")
    parser.add_argument("--budget-lists", type=int, default=2, help="lists mixed per trial")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated backends to leave out")
    parser.add_argument("--out", type=Path, help="also write ce_backends.{json,md} here")
    parser.add_argument(
        "--bundle", type=Path, help="bundle root: add CrossEncoder.predict and its copies"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    catalog = pd.read_csv(args.catalog, keep_default_na=False)
    lists = candidate_lists(catalog, args.lists, args.candidates, args.history, seed=0)
    calibration = [
        p for pairs in candidate_lists(catalog, 30, 10, args.history, seed=1) for p in pairs
    ]
    pairs = [p for pairs in lists for p in pairs]
    skip = set(filter(None, args.skip.split(",")))

    reference = CrossEncoderScorer.load(args.model, device="cpu", max_length=args.max_length)
    lengths = [
        len(ids)
        for ids in reference.tokenizer(  # type: ignore[operator]
            [a for a, _ in pairs],
            [b for _, b in pairs],
            truncation=True,
            max_length=args.max_length,
        )["input_ids"]
    ]
    scorers: dict[str, Scorer] = {"torch-fp32": reference}
    if args.bundle:
        scorers = {"CrossEncoder.predict fp32": PredictScorer(args.model, args.max_length)}
        scorers["torch-fp32"] = reference
        scorers |= bundle_copies(args.bundle, args.max_length, args.threads)
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            for name, run in onnx_backends(reference, work, args.threads).items():
                scorers[name] = ArrayScorer(reference.tokenizer, args.max_length, run)
        except ImportError as exc:
            notes.append(f"ONNX Runtime backends skipped: {exc}")
        try:
            from ranking_service.quantized import Int8CrossEncoderScorer, export_int8

            scorers["ov-fp32"] = ArrayScorer(
                reference.tokenizer, args.max_length, openvino_fp32(reference, args.threads)
            )
            export_int8(args.model, work / "ov-weights", args.max_length)
            scorers["ov-int8-weights"] = Int8CrossEncoderScorer.load(
                work / "ov-weights", args.max_length, args.threads
            )
            export_int8(args.model, work / "ov-int8", args.max_length, calibration)
            scorers["ov-int8 (shipped)"] = Int8CrossEncoderScorer.load(
                work / "ov-int8", args.max_length, args.threads
            )
        except ImportError as exc:
            notes.append(f"OpenVINO backends skipped: {exc}")
        scorers = {k: v for k, v in scorers.items() if k not in skip}

        expected = reference.score(pairs, batch_size=args.candidates, max_batch_tokens=NO_BUDGET)
        rows: dict[str, dict[str, Any]] = {}
        for name, scorer in scorers.items():
            got = np.concatenate(
                [
                    scorer.score(p, batch_size=args.candidates, max_batch_tokens=NO_BUDGET)
                    for p in lists
                ]
            )
            rows[name] = {"agreement": agreement(got, expected, args.lists), "pairs_per_s": {}}

        sizes = [int(b) for b in args.batch_sizes.split(",")]
        timed = lists[: args.timed_lists]
        # Short trials, backends innermost: a busy neighbour slows every backend alike, and the
        # best of the rounds is the least disturbed one.
        best: dict[tuple[str, int], float] = {}
        for _ in range(args.rounds):
            for size in sizes:
                for name, scorer in scorers.items():
                    seconds = time_backend(scorer, timed, size, NO_BUDGET)
                    best[name, size] = min(best.get((name, size), np.inf), seconds)
        for (name, size), seconds in best.items():
            rows[name]["pairs_per_s"][str(size)] = len(timed) * args.candidates / seconds
        baseline = "CrossEncoder.predict fp32"
        if baseline in rows:
            for row in rows.values():
                row["speedup_vs_predict"] = {
                    b: v / rows[baseline]["pairs_per_s"][b] for b, v in row["pairs_per_s"].items()
                }

        budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
        # Several requests' pairs in one call, as the dynamic batcher sends them.
        mixed = [p for pairs in lists[: args.budget_lists] for p in pairs]
        random.Random(2).shuffle(mixed)
        budget_batch = max(sizes)
        budget_best: dict[tuple[str, str], float] = {}
        budget_names = [n for n in ("torch-fp32", "ov-int8 (shipped)") if n in scorers]
        for _ in range(args.rounds):
            for budget in budgets:
                for name in budget_names:
                    label = str(budget) if budget else "none"
                    seconds = time_backend(
                        scorers[name], [mixed], budget_batch, budget or NO_BUDGET
                    )
                    budget_best[name, label] = min(budget_best.get((name, label), np.inf), seconds)
        budget_rows: dict[str, dict[str, float]] = {n: {} for n in budget_names}
        for (name, label), seconds in budget_best.items():
            budget_rows[name][label] = len(mixed) / seconds

    report = {
        "threads": args.threads,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "lists": args.lists,
        "candidates": args.candidates,
        "rounds": args.rounds,
        "batch_sizes": sizes,
        "budget_batch_size": budget_batch,
        "budget_lists": args.budget_lists,
        "token_length_p50": float(np.median(lengths)),
        "token_length_max": int(max(lengths)),
        "backends": rows,
        "budgets": budget_rows,
        "notes": notes,
        "versions": {"torch": torch.__version__},
    }
    for module in ("onnxruntime", "openvino", "nncf", "transformers"):
        with contextlib.suppress(ImportError):
            report["versions"][module] = __import__(module).__version__
    text = markdown(report) + "".join(f"\nNote: {n}\n" for n in notes)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "ce_backends.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "ce_backends.md").write_text(text)


if __name__ == "__main__":
    main()
