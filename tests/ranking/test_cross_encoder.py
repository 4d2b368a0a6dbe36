"""Cross-encoder scoring: the context text, parity with sentence-transformers, order, bad dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ranking_service.cross_encoder import DEFAULT_MAX_LENGTH, CrossEncoderScorer, build_context
from ranking_service.train import RankerTrainConfig
from recsys.core.errors import InvalidInput

PAIRS = [
    ("running shoes", "Trail running shoes. Running. Grippy soles for muddy paths."),
    ("Recently: Burr coffee grinder; French press", "Whole bean dark roast coffee. Coffee"),
    ("laptop. Recently: Laptop sleeve 14-inch", "13-inch ultrabook laptop. Laptops"),
    ("tent", "Cast iron skillet 12-inch. Cookware. Seasoned, oven-safe, lasts for decades."),
    ("toys for kids", "Wooden toy train set. Toys"),
]


@pytest.fixture(scope="module")
def model_dir(base_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The backbone saved as a sentence-transformers CrossEncoder with a seeded 1-logit head."""
    from sentence_transformers.cross_encoder import CrossEncoder

    torch.manual_seed(0)
    model = CrossEncoder(str(base_model_dir), num_labels=1, device="cpu", local_files_only=True)
    out = tmp_path_factory.mktemp("ce") / "model"
    model.save_pretrained(str(out))
    return out


def test_build_context_cases() -> None:
    assert build_context("  red shoes ", []) == "red shoes"
    assert build_context("", ["Tent", "Stove"]) == "Recently: Tent; Stove"
    assert build_context("lantern", ["Tent", " ", "Stove"]) == "lantern. Recently: Tent; Stove"
    history = [f"item {i}" for i in range(8)]  # most recent first
    assert build_context("", history, max_history=3) == "Recently: item 0; item 1; item 2"
    assert build_context("", []) == ""


def test_scores_equal_sentence_transformers(model_dir: Path) -> None:
    from sentence_transformers.cross_encoder import CrossEncoder

    reference = CrossEncoder(str(model_dir), device="cpu", local_files_only=True)
    expected = reference.predict(PAIRS, activation_fn=torch.nn.Identity(), batch_size=2)
    scorer = CrossEncoderScorer.load(model_dir, device="cpu", max_length=reference.max_length)
    assert scorer.device == "cpu" and scorer.name == "model"
    got = scorer.score(PAIRS, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_input_order_is_kept_whatever_the_batching(model_dir: Path) -> None:
    scorer = CrossEncoderScorer.load(model_dir, device="cpu")
    one_by_one = np.array([scorer.score([pair])[0] for pair in PAIRS])
    np.testing.assert_allclose(scorer.score(PAIRS, batch_size=3), one_by_one, atol=1e-5)
    reversed_scores = scorer.score(PAIRS[::-1], batch_size=64)
    np.testing.assert_allclose(reversed_scores[::-1], one_by_one, atol=1e-5)
    assert scorer.score([]).shape == (0,)


def test_training_and_serving_truncate_to_the_same_default_length(base_model_dir: Path) -> None:
    scorer = CrossEncoderScorer.load(base_model_dir, device="cpu")
    assert scorer.max_length == RankerTrainConfig().max_length == DEFAULT_MAX_LENGTH


def test_a_bare_backbone_gets_a_reproducible_head(base_model_dir: Path) -> None:
    first = CrossEncoderScorer.load(base_model_dir, device="cpu").score(PAIRS[:2])
    second = CrossEncoderScorer.load(base_model_dir, device="cpu").score(PAIRS[:2])
    np.testing.assert_array_equal(first, second)


def test_not_a_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=str(tmp_path)):
        CrossEncoderScorer.load(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InvalidInput, match=str(tmp_path)):
        CrossEncoderScorer.load(tmp_path, device="cpu")
    missing = tmp_path / "nowhere"
    with pytest.raises(InvalidInput, match="nowhere"):
        CrossEncoderScorer.load(missing, device="cpu")
