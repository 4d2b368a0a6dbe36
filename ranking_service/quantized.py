"""An int8 copy of a fine-tuned cross-encoder for CPU serving: OpenVINO IR quantized with NNCF.

`export_int8` converts the PyTorch model (the one `CrossEncoderScorer` loads) to OpenVINO and
quantizes it: with calibration pairs, weights *and* activations go int8 (NNCF post-training
quantization for transformers, SmoothQuant included); without, only the weights do (data-free,
less speed-up). `Int8CrossEncoderScorer` then scores like `CrossEncoderScorer`: same tokenizer
truncation, same token batches, float32 logits in input order.

Why OpenVINO and not ONNX Runtime: on the MovieLens cross-encoder (2 threads, see
`benchmarks/ce_backends.py`) NNCF's static int8 model ran about 2× faster than ONNX Runtime's
dynamic int8 one and kept rankings closer to fp32 (Spearman ≈ 0.997 vs ≈ 0.98); ONNX Runtime's
static QDQ quantization was slower still and further off.

Calibration must look like serving traffic: pairs from another domain gave Spearman ≈ 0.976 and
top-10 overlap 0.77 on MovieLens, against 0.997 and 0.97 with MovieLens pairs.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import openvino as ov
import torch

from ranking_service.cross_encoder import (
    DEFAULT_MAX_BATCH_TOKENS,
    DEFAULT_MAX_LENGTH,
    CrossEncoderScorer,
    encode_batches,
    score_batches,
)
from recsys.core.errors import InvalidInput, first_line

log = logging.getLogger(__name__)

BACKEND = "openvino"
MODEL_XML = "model_int8.xml"
MODEL_BIN = "model_int8.bin"
INFO_FILE = "int8.json"
# Calibration pairs used at most, and per forward pass while collecting statistics.
CALIBRATION_PAIRS = 300
_CALIBRATION_BATCH = 10
# Ops left in float run in fp32, never bf16, whatever the CPU offers: scores should not depend on
# which host serves them (OpenVINO's bf16 default was ~5% faster on an AVX512-BF16 CPU and drifted
# a little further from PyTorch: mean |Δlogit| 0.071 vs 0.067).
_PRECISION = "f32"

Pair = tuple[str, str]


class _Logits(torch.nn.Module):
    """Named token arrays → one logit per pair: the graph OpenVINO traces."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def _versions() -> dict[str, str]:
    import nncf
    import transformers

    return {
        "openvino": ov.get_version().split("-")[0],
        "nncf": nncf.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def export_int8(
    model_dir: Path,
    out_dir: Path,
    max_length: int = DEFAULT_MAX_LENGTH,
    calibration_pairs: Sequence[Pair] | None = None,
) -> dict[str, Any]:
    """Writes an int8 OpenVINO copy of the cross-encoder in `model_dir`, and its tokenizer, to `out_dir`.

    `calibration_pairs` should be (context, item text) pairs like those served (up to
    CALIBRATION_PAIRS are sampled); without them only the weights are quantized. Returns the
    manifest section (also written to `out_dir/int8.json`).
    """
    import nncf

    started = time.perf_counter()
    out_dir = Path(out_dir)
    # Same loading rules as serving (bare backbone → seeded 1-logit head); raises InvalidInput.
    source = CrossEncoderScorer.load(Path(model_dir), device="cpu", max_length=max_length)
    lock = threading.Lock()
    # Two pairs of different lengths, so the traced graph keeps the attention mask.
    example_pairs = [("a context", "an item"), ("a longer context than that", "an item text")]
    _, example = next(encode_batches(source.tokenizer, lock, example_pairs, max_length, 2, 1 << 30))
    with torch.inference_mode(), warnings.catch_warnings():
        # Tracing notes shape checks it freezes; the padded example keeps the masked path.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)
        model = ov.convert_model(
            _Logits(source.model).eval(),
            example_input={k: torch.from_numpy(v) for k, v in example.items()},
        )
    pairs = list(calibration_pairs or [])
    if len(pairs) > CALIBRATION_PAIRS:
        pairs = random.Random(0).sample(pairs, CALIBRATION_PAIRS)
    nncf.set_log_level(logging.ERROR)
    if pairs:
        batches = [
            arrays
            for _, arrays in encode_batches(
                source.tokenizer, lock, pairs, max_length, _CALIBRATION_BATCH, 1 << 30
            )
        ]
        model = nncf.quantize(
            model,
            nncf.Dataset(batches),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(batches),
        )
        quantization = "int8 weights and activations (NNCF post-training quantization)"
    else:
        log.info("%s: no calibration pairs, quantizing the weights only", model_dir)
        model = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
        quantization = "int8 weights (NNCF weight compression, data-free)"
    out_dir.mkdir(parents=True, exist_ok=True)
    # Float constants (embeddings, norms) stay fp32: fp16 storage would shift the scores again.
    ov.save_model(model, out_dir / MODEL_XML, compress_to_fp16=False)
    tokenizer_files = source.tokenizer.save_pretrained(str(out_dir))  # type: ignore[attr-defined]
    section: dict[str, Any] = {
        "backend": BACKEND,
        "quantization": quantization,
        "calibration_pairs": len(pairs),
        "max_length": max_length,
        "inference_precision": _PRECISION,
        "files": sorted(
            {MODEL_XML, MODEL_BIN, INFO_FILE}
            | {Path(f).name for f in tokenizer_files if (out_dir / Path(f).name).is_file()}
        ),
        "versions": _versions(),
    }
    section["seconds"] = round(time.perf_counter() - started, 1)
    (out_dir / INFO_FILE).write_text(json.dumps(section, indent=2, sort_keys=True) + "\n")
    return section


@dataclass
class Int8CrossEncoderScorer:
    """Scores (context, item) pairs with an `export_int8` directory, on the CPU."""

    name: str
    max_length: int
    threads: int
    compiled: Any = field(repr=False)
    tokenizer: Any = field(repr=False)
    device: str = "cpu"

    def __post_init__(self) -> None:
        # Fast tokenizers are not safe to call from two threads at once; one infer request is
        # not either, so each has its own lock (tokenizing may overlap a forward pass).
        self._tokenizer_lock = threading.Lock()
        self._infer_lock = threading.Lock()
        self._request = self.compiled.create_infer_request()
        self._inputs = [i.get_any_name() for i in self.compiled.inputs]

    @classmethod
    def load(cls, model_dir: Path, max_length: int = DEFAULT_MAX_LENGTH, threads: int = 0) -> Self:
        """Compiles the int8 model for the CPU with `threads` inference threads (0: OpenVINO's choice)."""
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / MODEL_XML).is_file():
            raise InvalidInput(
                f"{model_dir}: not an int8 cross-encoder directory (no {MODEL_XML}; make one with export_int8)"
            )
        config = {
            "INFERENCE_NUM_THREADS": max(0, threads),
            "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": _PRECISION,
        }
        try:
            compiled = ov.Core().compile_model(model_dir / MODEL_XML, "CPU", config)
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError, RuntimeError) as exc:
            first = first_line(exc)
            raise InvalidInput(
                f"{model_dir}: cannot load an int8 cross-encoder ({first})"
            ) from None
        return cls(model_dir.name, max_length, threads, compiled, tokenizer)

    def score(
        self,
        pairs: Sequence[Pair],
        batch_size: int = 64,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
    ) -> np.ndarray:
        """Raw logits for each pair, in input order; batched as `CrossEncoderScorer.score` does."""

        def forward(arrays: dict[str, np.ndarray]) -> np.ndarray:
            with self._infer_lock:
                result = self._request.infer({k: arrays[k] for k in self._inputs})
                return np.array(result[0], np.float32)

        return score_batches(
            self.tokenizer,
            self._tokenizer_lock,
            pairs,
            self.max_length,
            batch_size,
            max_batch_tokens,
            forward,
        )
