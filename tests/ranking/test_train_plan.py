"""Fine-tuning's time budget: the steps that fit it, and a step timed without training on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset

from ranking_service.train import RankerTrainConfig
from ranking_service.train_plan import VALIDATIONS, native_bf16, plan_steps, step_seconds
from recsys.core.errors import InvalidInput


def test_the_steps_are_what_the_budget_leaves_after_the_validation_passes() -> None:
    config = RankerTrainConfig(steps=150, seconds=300.0)
    # 300 s - 40 s spent - 3 passes of 20 s = 200 s: 50 steps of 4 s.
    plan = plan_steps(config, spent=40.0, validation_seconds=20.0, step_seconds=4.0)
    assert VALIDATIONS == 3 and plan.steps == 50
    assert plan.record() == {
        "budget_seconds": 300.0,
        "step_seconds": 4.0,
        "validation_seconds": 20.0,
        "spent_seconds": 40.0,
    }
    assert "50 of at most 150 steps fit 300 s" in plan.describe()
    # A fast machine runs the steps asked for, and no more.
    assert plan_steps(config, 40.0, 20.0, step_seconds=0.1).steps == 150
    # A budget already spent still trains one step: a model comes out.
    assert plan_steps(config, 400.0, 20.0, step_seconds=4.0).steps == 1
    # No budget: the steps asked for, nothing measured.
    free = plan_steps(RankerTrainConfig(steps=150, seconds=None), 40.0, 20.0, None)
    assert free.steps == 150 and free.record()["step_seconds"] is None


def test_a_budget_must_be_positive() -> None:
    with pytest.raises(InvalidInput, match="seconds=0"):
        RankerTrainConfig(seconds=0)


def test_timing_a_step_leaves_the_model_and_the_random_state_as_they_were(
    base_model_dir: Path,
) -> None:
    from sentence_transformers.cross_encoder import CrossEncoder
    from sentence_transformers.cross_encoder.losses import LambdaLoss

    torch.manual_seed(0)
    model = CrossEncoder(str(base_model_dir), num_labels=1, max_length=32, device="cpu")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = Dataset.from_dict(
        {
            "query": ["espresso at home", "a tent for two"],
            "docs": [["Burr grinder", "Chef knife"], ["Dome tent", "Coffee beans"]],
            "labels": [[1, 0], [1, 0]],
        }
    )
    state = torch.random.get_rng_state()
    seconds = step_seconds(LambdaLoss(model), dataset, 2, "cpu", native_bf16("cpu"))
    assert seconds > 0
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
