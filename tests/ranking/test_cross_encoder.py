"""Cross-encoder scoring: the context text, parity with sentence-transformers, order, token
batches, bad dirs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ranking_service.cross_encoder import (
    DEFAULT_MAX_LENGTH,
    CrossEncoderScorer,
    build_context,
    token_batches,
)
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
def model_dir(cross_encoder_dir: Path) -> Path:
    """The backbone with a seeded 1-logit head, saved as a CrossEncoder (conftest)."""
    return cross_encoder_dir


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


@settings(max_examples=300, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 600), max_size=80),
    max_tokens=st.integers(1, 4096),
    max_pairs=st.integers(1, 100),
)
def test_token_batches_cover_every_pair_once_within_the_budget(
    lengths: list[int], max_tokens: int, max_pairs: int
) -> None:
    batches = token_batches(lengths, max_tokens, max_pairs)
    flat = np.concatenate(batches) if batches else np.zeros(0, np.int64)
    # Every index once, longest first, ties in input order.
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert flat.tolist() == sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for n, batch in enumerate(batches):
        longest = max(lengths[i] for i in batch)
        assert 1 <= len(batch) <= max_pairs
        assert len(batch) * longest <= max_tokens or len(batch) == 1
        if longest > max_tokens:
            assert len(batch) == 1
        if n + 1 < len(batches):  # greedy: the next pair would not have fitted
            assert len(batch) + 1 > max_pairs or (len(batch) + 1) * longest > max_tokens


def test_token_batches_examples() -> None:
    got = token_batches([5, 50, 10, 10, 200], max_tokens=100, max_pairs=3)
    assert [b.tolist() for b in got] == [[4], [1, 2], [3, 0]]
    assert token_batches([], 100, 3) == []
    with pytest.raises(ValueError):
        token_batches([1], 0, 3)


LONGER_PAIRS = [
    *PAIRS,
    ("Recently: " + "; ".join(["Stainless steel garden trowel. Garden"] * 12), "Garden hose"),
    ("a", "b"),
    ("camping tent. Recently: Down sleeping bag", "Two-person backpacking tent. Camping"),
]


@pytest.mark.parametrize(
    ("batch_size", "max_batch_tokens"), [(64, 1), (64, 40), (2, 100), (3, 4096), (64, 1 << 20)]
)
def test_scores_equal_one_at_a_time_whatever_the_token_budget(
    model_dir: Path, batch_size: int, max_batch_tokens: int
) -> None:
    scorer = CrossEncoderScorer.load(model_dir, device="cpu", max_length=64)
    one_by_one = np.array([scorer.score([pair])[0] for pair in LONGER_PAIRS])
    got = scorer.score(LONGER_PAIRS, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    assert got.dtype == np.float32 and got.shape == (len(LONGER_PAIRS),)
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
