"""TextEncoder against the real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from sentence_transformers import SentenceTransformer

from recsys.core.encoder import TextEncoder, default_encoder_dir
from recsys.core.errors import InvalidInput


def test_default_encoder_dir_is_a_model() -> None:
    assert (default_encoder_dir() / "config.json").is_file()


def test_outputs_are_normalised_float32(encoder: TextEncoder, item_vectors: np.ndarray) -> None:
    assert item_vectors.dtype == np.float32
    assert item_vectors.shape == (24, encoder.dimension) == (24, 384)
    np.testing.assert_allclose(np.linalg.norm(item_vectors, axis=1), 1.0, atol=1e-5)


def test_empty_input_gives_empty_matrix(encoder: TextEncoder) -> None:
    assert encoder.encode([]).shape == (0, 384)


def test_order_is_preserved_despite_length_batching(
    encoder: TextEncoder, texts: list[str], item_vectors: np.ndarray
) -> None:
    shuffled = list(range(len(texts)))
    random.Random(7).shuffle(shuffled)
    # Small batches of mixed lengths: sorting regroups them, the output must not move.
    batched = encoder.encode([texts[i] for i in shuffled], batch_size=5)
    one_by_one = np.stack([encoder.encode([texts[i]])[0] for i in shuffled])
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    np.testing.assert_allclose(batched, item_vectors[shuffled], atol=1e-5)


def test_mean_pooling_matches_sentence_transformers(
    encoder: TextEncoder, texts: list[str], item_vectors: np.ndarray
) -> None:
    baseline = SentenceTransformer(str(default_encoder_dir()), device="cpu")
    expected = baseline.encode(texts, batch_size=8, normalize_embeddings=True)
    np.testing.assert_allclose(item_vectors, expected, atol=1e-4)


@pytest.mark.parametrize("pooling", ["cls", "last_token"])
def test_other_poolings_differ_and_survive_left_padding(
    pooling: str, texts: list[str], item_vectors: np.ndarray
) -> None:
    pooled = TextEncoder.load(default_encoder_dir(), pooling=pooling, device="cpu")  # type: ignore[arg-type]
    sample = texts[:8]
    right = pooled.encode(sample)
    alone = np.stack([pooled.encode([t])[0] for t in sample])
    np.testing.assert_allclose(np.linalg.norm(right, axis=1), 1.0, atol=1e-5)
    assert np.abs(right - item_vectors[:8]).max() > 0.05  # not the mean in disguise
    np.testing.assert_allclose(right, alone, atol=1e-4)
    # Decoder embedders pad on the left; the pooled token must still be the right one.
    pooled.tokenizer.padding_side = "left"
    left = pooled.encode(sample)
    np.testing.assert_allclose(left, alone, atol=1e-4)


def test_cls_and_last_token_differ(texts: list[str]) -> None:
    first = TextEncoder.load(default_encoder_dir(), pooling="cls", device="cpu")
    last = TextEncoder.load(default_encoder_dir(), pooling="last_token", device="cpu")
    assert np.abs(first.encode(texts[:4]) - last.encode(texts[:4])).max() > 0.05


def test_truncates_to_max_length() -> None:
    short = TextEncoder.load(default_encoder_dir(), device="cpu", max_length=8)
    long_text = "a very long description " * 50
    np.testing.assert_allclose(
        short.encode([long_text]), short.encode([long_text + " and more words"]), atol=1e-6
    )


@pytest.mark.parametrize(
    ("setup", "problem"),
    [
        ("missing", "does not exist"),
        ("empty", "no config.json"),
        ("broken", "cannot load a Hugging Face model"),
    ],
)
def test_not_a_model_directory_is_invalid_input(tmp_path: Path, setup: str, problem: str) -> None:
    model_dir = tmp_path / "not-a-model"
    if setup != "missing":
        model_dir.mkdir()
    if setup == "broken":
        (model_dir / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(InvalidInput) as caught:
        TextEncoder.load(model_dir, device="cpu")
    message = str(caught.value)
    assert str(model_dir) in message and problem in message
    assert "\n" not in message


def test_unknown_pooling_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="--pooling 'max'"):
        TextEncoder.load(default_encoder_dir(), pooling="max", device="cpu")  # type: ignore[arg-type]


def test_non_string_text_is_invalid_input(encoder: TextEncoder) -> None:
    with pytest.raises(InvalidInput, match=r"texts\[1\]: expected a string"):
        encoder.encode(["fine", None])  # type: ignore[list-item]
