"""The text sequence model: what follows a history, read from the items' text embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ranking_service import text_sequence
from ranking_service.content import ItemVectors
from ranking_service.text_sequence import DECAY, RECENT, TextSequence, context


def clusters(per: int = 10, dim: int = 16, seed: int = 0) -> np.ndarray:
    """Two clusters of unit vectors ("tip boxes", rows < per, and "pipettes"), far apart."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim, dtype=np.float32)[:2] * 3
    vectors = np.concatenate([centres[k] + rng.normal(size=(per, dim)) for k in (0, 1)])
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def test_it_learns_what_follows_not_what_looks_alike() -> None:
    vectors, per = clusters(), 10
    rng = np.random.default_rng(1)
    # Every sequence goes from the first cluster to the second: a tip box, then a pipette.
    sequences = [[int(rng.integers(per)), per + int(rng.integers(per))] for _ in range(8000)]
    held_out = [([int(rng.integers(per))], per + int(rng.integers(per))) for _ in range(50)]
    model, record = text_sequence.train(vectors, sequences, held_out, seed=0, seconds=60)
    assert model is not None
    assert record["steps"] == 8000 and record["held_out"] == 50
    assert 1 <= record["epochs"] <= text_sequence.MAX_EPOCHS
    # The held-out loss was tracked, and the kept epoch is its lowest.
    assert min(record["held_out_loss"]) == record["held_out_loss"][record["epochs"] - 1]
    after_tip_box = model.scores(vectors[[3]], vectors)
    # Content similarity ranks the first cluster first; the sequence model the second.
    assert (vectors @ vectors[3])[:per].mean() > (vectors @ vectors[3])[per:].mean()
    assert after_tip_box[per:].mean() > after_tip_box[:per].mean()
    assert record["held_out_loss"][0] > min(record["held_out_loss"])


def test_training_is_seeded() -> None:
    vectors = clusters()
    sequences = [[k % 10, 10 + (k * 7) % 10, k % 10] for k in range(60)]
    first, _ = text_sequence.train(vectors, sequences, [], seed=3, seconds=60)
    again, record = text_sequence.train(vectors, sequences, [], seed=3, seconds=60)
    assert first is not None and again is not None
    np.testing.assert_array_equal(first.context_adapter, again.context_adapter)
    # Without held-out steps there is no early stop: every epoch runs.
    assert record["epochs"] == text_sequence.MAX_EPOCHS and record["held_out_loss"] == []


def test_nothing_to_learn_from_is_said() -> None:
    model, record = text_sequence.train(clusters(), [[1], [], [4]], [])
    assert model is None and "no sequence" in record["skipped"]


def test_the_context_weighs_the_most_recent_most() -> None:
    past = np.eye(RECENT + 2, dtype=np.float32)
    weights = context(past)[: RECENT + 2]
    expected = DECAY ** np.arange(RECENT, dtype=np.float32)
    np.testing.assert_allclose(weights[:RECENT], expected / np.linalg.norm(expected), rtol=1e-6)
    assert not weights[RECENT:].any()  # older items are not read


def test_a_saved_model_loads_the_same(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model = TextSequence(*(rng.normal(size=(8, 8)).astype(np.float32) for _ in range(2)))
    model.save(tmp_path)
    loaded = TextSequence.load(tmp_path)
    assert loaded is not None
    past, candidates = rng.normal(size=(3, 8)), rng.normal(size=(5, 8))
    np.testing.assert_array_equal(loaded.scores(past, candidates), model.scores(past, candidates))
    assert TextSequence.load(tmp_path / "elsewhere") is None


def test_large_catalogs_score_a_sample_with_the_targets() -> None:
    generator = torch.Generator().manual_seed(0)
    n = text_sequence.SOFTMAX_ITEMS * 3
    targets = torch.tensor([5, n - 1, 5, 77])
    columns, labels = text_sequence._softmax_columns(targets, n, generator)
    assert columns is not None and len(columns) <= text_sequence.SOFTMAX_ITEMS + len(targets)
    assert torch.equal(columns[labels], targets)
    assert text_sequence._softmax_columns(targets, 100, generator) == (None, targets)


def test_content_scores_carry_the_sequence_score_for_new_products_too() -> None:
    vectors = clusters()
    model = TextSequence(np.eye(16, dtype=np.float32), np.eye(16, dtype=np.float32))
    ids = [f"i{k}" for k in range(20)]
    store = ItemVectors(ids, vectors, sequence=model)
    scores = store.scores(["i12", "gone"], ["i3", "i4"])
    assert scores is not None
    assert scores.sequence[0] == pytest.approx(
        float(model.scores(vectors[[3, 4]], vectors[[12]])[0])
    )
    assert np.isnan(scores.sequence[1])  # not in the catalog and no text to read
    plain = ItemVectors(ids, vectors).scores(["i12"], ["i3"])
    assert plain is not None and np.isnan(plain.sequence).all()
