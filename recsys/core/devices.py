"""Chooses the compute device once, so CPU and CUDA take the same code path."""

from __future__ import annotations

from recsys.core.errors import InvalidInput


def resolve_device(device: str) -> str:
    """Maps auto|cpu|cuda to "cpu" or "cuda"; asking for cuda without one is an input error."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"--device {device!r}: expected auto, cpu or cuda")
    if device == "cpu":
        return "cpu"
    import torch  # only where a model is about to load: importing recsys.core stays light

    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise InvalidInput("--device cuda: no CUDA device is available on this machine")
    return "cpu"
