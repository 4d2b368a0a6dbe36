"""build_retrieval end to end: real encoder, real FAISS, files on disk, reloadable bundle part."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recsys.core.errors import InvalidInput
from retrieval_service.build import RetrievalBuild, build_retrieval
from retrieval_service.encoder import TextEncoder, default_encoder_dir
from retrieval_service.index import VectorIndex


@pytest.fixture(scope="module")
def built(
    catalog: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, RetrievalBuild]:
    out = tmp_path_factory.mktemp("retrieval")
    return out, build_retrieval(catalog, out, default_encoder_dir(), factory="Flat", device="cpu")


def test_writes_embeddings_index_and_encoder(
    built: tuple[Path, RetrievalBuild], item_vectors: np.ndarray
) -> None:
    out, _ = built
    embeddings = np.load(out / "embeddings.npy")
    assert embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, item_vectors, atol=1e-5)  # row i = catalog row i
    assert (out / "index.faiss").is_file()
    copied = {p.relative_to(out / "encoder").as_posix() for p in (out / "encoder").rglob("*")}
    assert {"config.json", "model.safetensors", "tokenizer.json", "1_Pooling/config.json"} <= copied
    assert "README.md" not in copied and ".gitattributes" not in copied


def test_manifest_sections(built: tuple[Path, RetrievalBuild]) -> None:
    _, result = built
    manifest = result.manifest
    assert manifest["encoder"]["pooling"] == "mean"
    assert manifest["encoder"]["dimension"] == 384
    assert manifest["encoder"]["name"] == result.encoder.name
    assert manifest["index"] == {"factory": "Flat", "size": 24, "nprobe": 16, "device_built": "cpu"}
    assert manifest["timings"]["items_per_second"] > 0


def test_encoder_copy_loads_and_gives_identical_vectors(
    built: tuple[Path, RetrievalBuild], texts: list[str]
) -> None:
    out, result = built
    copy = TextEncoder.load(out / "encoder", device="cpu")
    assert copy.name == result.encoder.name  # the name survives the copy
    np.testing.assert_array_equal(copy.encode(texts), result.encoder.encode(texts))


def test_saved_index_serves_the_catalog(
    built: tuple[Path, RetrievalBuild], item_vectors: np.ndarray
) -> None:
    out, result = built
    index = VectorIndex.load(out / "index.faiss", factory="Flat", device="cpu")
    _, rows = index.search(item_vectors, 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(item_vectors)))
    assert result.index.ntotal == index.ntotal == len(item_vectors)


def test_bad_factory_fails_before_writing(catalog: pd.DataFrame, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="IVF64,Flat"):
        build_retrieval(catalog, tmp_path / "out", default_encoder_dir(), factory="IVF64,Flat")
    assert not (tmp_path / "out").exists()


def test_catalog_without_title_is_invalid_input(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="title"):
        build_retrieval(pd.DataFrame({"item_id": ["a"]}), tmp_path, default_encoder_dir())
