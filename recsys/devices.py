"""Chooses the compute device once, so CPU and CUDA take the same code path."""

from __future__ import annotations

import torch

from recsys.errors import InvalidInput


def resolve_device(device: str) -> str:
    """Maps auto|cpu|cuda to "cpu" or "cuda"; asking for cuda without one is an input error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput("--device cuda: no CUDA device is available on this machine")
        return "cuda"
    raise InvalidInput(f"--device {device!r}: expected auto, cpu or cuda")
