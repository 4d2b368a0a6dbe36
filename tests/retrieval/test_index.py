"""VectorIndex over real FAISS indexes of several types."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.core.errors import InvalidInput
from retrieval_service.index import VectorIndex


def unit_vectors(n: int, dim: int = 64, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def vectors() -> np.ndarray:
    # Enough for IVF64 and 8-bit PQ codebooks to train without thin-cluster warnings.
    return unit_vectors(3000)


def self_recall_at_1(index: VectorIndex, vectors: np.ndarray) -> float:
    _, rows = index.search(vectors, 1)
    return float((rows[:, 0] == np.arange(len(vectors))).mean())


def test_flat_is_exact(vectors: np.ndarray) -> None:
    index = VectorIndex.build(vectors, "Flat", device="cpu")
    scores, rows = index.search(vectors[:50], 5)
    assert index.ntotal == 3000 and index.dimension == 64 and index.device == "cpu"
    assert scores.dtype == np.float32 and rows.dtype == np.int64
    np.testing.assert_array_equal(rows[:, 0], np.arange(50))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    expected = np.sort(vectors[:50] @ vectors.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(scores, expected, atol=1e-5)


@pytest.mark.parametrize(
    ("factory", "minimum"), [("IVF64,Flat", 0.99), ("HNSW32", 0.99), ("IVF16,PQ16", 0.9)]
)
def test_approximate_indexes_find_each_vector_first(
    vectors: np.ndarray, factory: str, minimum: float
) -> None:
    index = VectorIndex.build(vectors, factory, device="cpu")
    assert index.factory == factory and index.ntotal == len(vectors)
    assert self_recall_at_1(index, vectors[:500]) >= minimum


def test_real_item_vectors_find_themselves(item_vectors: np.ndarray) -> None:
    index = VectorIndex.build(item_vectors, "Flat", device="cpu")
    _, rows = index.search(item_vectors, 3)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(item_vectors)))


@pytest.mark.parametrize("factory", ["IVFx,Flat", "Flat,IVF64", "", "HNSWabc"])
def test_invalid_factory_is_invalid_input(vectors: np.ndarray, factory: str) -> None:
    with pytest.raises(InvalidInput, match="--index-factory") as caught:
        VectorIndex.build(vectors[:10], factory)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("factory", "needed"), [("IVF256,Flat", "at least 256"), ("IVF4,PQ8", "at least 256")]
)
def test_too_few_training_vectors_is_invalid_input(
    vectors: np.ndarray, factory: str, needed: str
) -> None:
    with pytest.raises(InvalidInput, match=needed) as caught:
        VectorIndex.build(vectors[:100], factory)
    assert "got 100" in str(caught.value)


def test_wrong_dimension_is_invalid_input(vectors: np.ndarray) -> None:
    index = VectorIndex.build(vectors[:10], "Flat")
    with pytest.raises(InvalidInput, match="dimension 64"):
        index.search(unit_vectors(2, dim=32), 1)
    with pytest.raises(InvalidInput, match="dimension 64"):
        index.add(unit_vectors(2, dim=32))


def test_fewer_rows_than_k_pads_with_minus_one(vectors: np.ndarray) -> None:
    index = VectorIndex.build(vectors[:3], "Flat")
    scores, rows = index.search(vectors[:2], 5)
    assert rows.shape == (2, 5)
    assert (rows[:, 3:] == -1).all() and np.isneginf(scores[:, 3:]).all()
    empty = VectorIndex.build(vectors[:0], "Flat")
    assert empty.ntotal == 0
    assert (empty.search(vectors[:1], 2)[1] == -1).all()


def test_add_appends_with_continuing_row_ids(vectors: np.ndarray) -> None:
    index = VectorIndex.build(vectors[:1000], "IVF16,Flat", nprobe=16)
    index.add(vectors[1000:1010])
    assert index.ntotal == 1010
    _, rows = index.search(vectors[1000:1010], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(1000, 1010))


@pytest.mark.parametrize("factory", ["Flat", "IVF32,Flat", "HNSW16", "IVF8,PQ8"])
def test_save_load_round_trip(vectors: np.ndarray, tmp_path: Path, factory: str) -> None:
    index = VectorIndex.build(vectors[:1000], factory, nprobe=4)
    path = tmp_path / "index.faiss"
    index.save(path)
    loaded = VectorIndex.load(path, factory=factory, nprobe=4)
    assert (loaded.ntotal, loaded.factory, loaded.dimension) == (1000, factory, 64)
    before = index.search(vectors[:20], 5)
    after = loaded.search(vectors[:20], 5)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_allclose(before[0], after[0], atol=1e-6)


def test_load_rejects_missing_and_foreign_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        VectorIndex.load(tmp_path / "absent.faiss", factory="Flat")
    junk = tmp_path / "junk.faiss"
    junk.write_bytes(b"not an index")
    with pytest.raises(InvalidInput, match="not a readable FAISS index"):
        VectorIndex.load(junk, factory="Flat")
