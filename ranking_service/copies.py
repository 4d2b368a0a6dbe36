"""The copies of one fine-tuned cross-encoder a bundle may hold, and how each loads.

`fp32` is the fine-tuned model itself (PyTorch), `int8` its OpenVINO int8 copy, `student` the
smaller model distilled from it and `student_int8` the student's int8 copy. The build records
which one kept the teacher's validation NDCG (`cross_encoder.serving_copy`); on CUDA the int8
copies give way to their PyTorch model in half precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from ranking_service.cross_encoder import CrossEncoderScorer
from recsys.core import bundle as bundle_files

Copy = Literal["fp32", "int8", "student", "student_int8"]

DIRS: dict[str, str] = {
    "fp32": bundle_files.CROSS_ENCODER_DIR,
    "int8": bundle_files.CROSS_ENCODER_INT8_DIR,
    "student": bundle_files.CROSS_ENCODER_STUDENT_DIR,
    "student_int8": bundle_files.CROSS_ENCODER_STUDENT_INT8_DIR,
}
# The PyTorch model behind each copy, for devices where int8 does not run.
_TORCH_MODEL = {"fp32": "fp32", "int8": "fp32", "student": "student", "student_int8": "student"}


class Scorer(Protocol):
    """A copy of the cross-encoder: (context, item) pairs → logits, in input order."""

    def score(
        self, pairs: Sequence[tuple[str, str]], batch_size: int = ..., max_batch_tokens: int = ...
    ) -> np.ndarray: ...


def served_copy(copy: str, device: str) -> str:
    """The copy that actually runs on `device` ("cpu" or "cuda") when `copy` is asked for."""
    return copy if device == "cpu" else _TORCH_MODEL[copy]


def load_copy(
    copy: str, version_dir: Path, max_length: int, device: str, threads: int = 0
) -> Scorer:
    """Loads one copy from a bundle version directory, on a resolved device."""
    path = Path(version_dir) / DIRS[copy]
    if copy.endswith("int8"):
        from ranking_service.quantized import Int8CrossEncoderScorer

        return Int8CrossEncoderScorer.load(path, max_length, threads)
    if threads and device == "cpu":
        import torch

        torch.set_num_threads(threads)
    return CrossEncoderScorer.load(path, device=device, max_length=max_length)
