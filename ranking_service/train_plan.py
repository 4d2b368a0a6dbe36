"""How fine-tuning fits its time budget: the precision it trains in and how many steps it runs.

A build on a CPU spends most of its time fine-tuning the cross-encoder, and a step's cost
depends on the machine and on how long the data's texts are. So the budget is in seconds and
the steps follow from it: the validation pass before fine-tuning is timed, one step is timed on
the first batch, and the run takes the most steps (`RankerTrainConfig.steps` at most) that fit
with the validation passes still to come.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ranking_service.train import RankerTrainConfig

# Validation passes during training: the checkpoints best-model selection chooses among.
VALIDATIONS = 3


@dataclass(frozen=True)
class StepPlan:
    steps: int
    max_steps: int
    budget_seconds: float | None
    step_seconds: float | None  # measured here (None: no budget, nothing measured)
    validation_seconds: float  # one validation pass, measured before fine-tuning
    spent_seconds: float  # before the first step: mining, loading, the first validation pass

    def describe(self) -> str:
        if self.budget_seconds is None:
            return f"{self.steps} steps (no time budget)"
        return (
            f"{self.steps} of at most {self.max_steps} steps fit {self.budget_seconds:.0f} s "
            f"({self.step_seconds:.2f} s a step, {self.validation_seconds:.1f} s a validation "
            f"pass, {self.spent_seconds:.0f} s spent before the first step)"
        )

    def record(self) -> dict[str, Any]:
        return {
            "budget_seconds": self.budget_seconds,
            "step_seconds": None if self.step_seconds is None else round(self.step_seconds, 3),
            "validation_seconds": round(self.validation_seconds, 1),
            "spent_seconds": round(self.spent_seconds, 1),
        }


def plan_steps(
    config: RankerTrainConfig,
    spent: float,
    validation_seconds: float,
    step_seconds: float | None,
) -> StepPlan:
    """The most steps, `config.steps` at most and one at least, that fit what `spent` left of
    `config.seconds` with VALIDATIONS passes of `validation_seconds` still to run."""
    steps = config.steps
    if config.seconds is not None:
        if step_seconds is None:
            raise ValueError("a time budget needs the measured seconds of a step")
        left = config.seconds - spent - VALIDATIONS * validation_seconds
        steps = max(1, min(config.steps, int(left // max(step_seconds, 1e-9))))
    return StepPlan(steps, config.steps, config.seconds, step_seconds, validation_seconds, spent)


def step_seconds(loss: Any, dataset: Any, batch_size: int, device: str, bf16: bool) -> float:
    """Seconds of one training step here: `loss` (a sentence-transformers cross-encoder loss)
    forward and backward over the dataset's first batch of lists, timed on the second of two
    runs (the first warms up). Gradients are dropped, the weights untouched and torch's random
    state restored, so training runs as if it had not been measured."""
    import torch

    rows = dataset[:batch_size]
    inputs = [rows["query"], rows["docs"]]
    labels = [torch.tensor(row, dtype=torch.float32) for row in rows["labels"]]
    model = loss.model
    training = model.training
    seconds = 0.0
    with torch.random.fork_rng(devices=None if device == "cuda" else []):
        model.train()
        for _ in range(2):
            t0 = time.perf_counter()
            with autocast(device, bf16):
                value = loss(inputs, labels)
            value.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
    model.train(training)
    return seconds


def native_bf16(device: str) -> bool:
    """Whether fine-tuning runs in bf16 mixed precision: where the hardware computes bf16
    natively (CUDA with bf16; a CPU with AVX512-BF16 or AMX), faster there than fp32 at a
    validation figure within noise (docs/architecture.md, "Fine-tuning's time budget");
    elsewhere bf16 is emulated and slower than fp32."""
    import torch

    if device == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


@contextlib.contextmanager
def autocast(device: str, bf16: bool) -> Iterator[None]:
    """bf16 autocast on `device` where `bf16`, else nothing."""
    import torch

    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        yield
